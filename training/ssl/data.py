"""Pretraining data: DICOM images (FFDM and DBT mixed) from a folder or a labels CSV, sampled into
multi-crop batches by the tissue-aware sampler.

* Items. One item per image: an FFDM image gives one sample; a DBT volume gives one slice pair
  (slices i and i +/- k with the same boxes, flips and masks) drawn by the sampler from the item's seed.
* Determinism. An item is addressed by ``(epoch, index)``; its sampler seed comes from
  ``SeedSequence((seed, epoch, index))``, and the order of an epoch from ``(seed, epoch)``. So the batch
  of step ``s`` is a pure function of ``s``, whatever the number of workers and whether the run was
  resumed: :class:`StepBatches` yields the batches of steps ``start, start + 1, ...``.
* No tissue. Images where the tissue-aware sampler finds no tissue (:class:`NoTissueError`) are skipped;
  the batch lists them in ``skipped`` so the training loop can warn once with the totals.
* Memory. An LRU cache per process keeps the last ``cache_frames`` decoded frames with their tissue
  masks: a tiny dataset is decoded and segmented once, a large one holds only a few frames.
* Preprocessing cache. Given a :class:`training.ssl.cache.FrameCache` (what ``mammodino pretrain`` builds by
  default; ``--no-cache`` decodes instead), frames and tissue masks are read from its memory-mapped
  arrays instead of being decoded and segmented again on every draw. The sampling rule, seeds and batch
  layout are the same; what differs is the pixel grid (the cache's downsampled resolution, e.g. a
  1024 px long side) and 16-bit quantised intensities (see :mod:`training.ssl.cache`).
* Unreadable data never stops a long run. A path that cannot be opened is skipped when the data opens
  (one line on stderr, counted in :meth:`PretrainDataset.describe`); a frame that fails to decode or
  segment when drawn (or whose cache entry records an error) is skipped like an image without tissue,
  listed in the batch's ``unreadable``, with one line on stderr per image and process. No exception
  leaves a DataLoader worker for it.
* Workers. :func:`worker_options`: persistent workers, each prefetching :data:`PREFETCH_BATCHES` batches
  with one torch thread (``workers x threads`` would oversubscribe the cores the training step uses).

Collated batches are view-major, as :class:`training.ssl.models.SSLNetwork` and the losses expect: crop ``v``
of batch image ``b`` is row ``v * B + b``. A DBT pair counts as two batch images (its two slices), and
``dbt_pairs`` holds, for each global view, the rows of its two slices, ``dbt_volumes`` the item index of
the volume (pairs of one volume are never each other's negatives).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from training.errors import MammoInputError
from training.sampler.sampler import MultiCropSampler, NoTissueError, SamplerConfig, Sample
from training.tissue import frame_and_tissue
from training.labels import data_paths, open_data_skipping


if TYPE_CHECKING:
    from training.ssl.cache import FrameCache


@dataclass
class Item:
    """One sampled dataset item: an FFDM sample (``sample.pair`` is None), a DBT pair sample, or None
    when the image has no breast tissue or could not be read (``unreadable``): skipped."""

    index: int
    sample: Sample | None
    unreadable: bool = False


class _Unreadable(Exception):
    """A frame could not be decoded or segmented (already reported on stderr)."""


class PretrainDataset:
    """Images from ``source`` (a folder of DICOM files, or a CSV whose ``path`` column names files or
    series folders relative to the CSV), sampled deterministically from ``(seed, epoch, index)``."""

    def __init__(self, source: str | Path, config: SamplerConfig, seed: int = 0, naive: bool = False,
                 cache_frames: int = 8, cache: "FrameCache | str | Path | None" = None):
        self.source = Path(source)
        self.config = config
        self.seed = seed
        self.sampler = MultiCropSampler(config, tissue_aware=not naive)
        self.cache_frames = cache_frames
        self._recent: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._reported: set[int] = set()  # images whose failure this process printed
        self.images, self.unopened = open_data_skipping(self.source)
        self.cache: FrameCache | None = None
        self.entries: list[dict[str, Any]] = []
        if cache is not None:
            self.use_cache(cache)

    def use_cache(self, cache: "FrameCache | str | Path") -> None:
        """Read frames and tissue masks from a built preprocessing cache (every image must have an
        up-to-date entry: :func:`training.ssl.cache.build_cache`; an entry that records an error is an
        unreadable image)."""
        from training.ssl.cache import FrameCache

        self.cache = cache if isinstance(cache, FrameCache) else FrameCache(cache)
        self.entries = [self.cache.entry(image) for image in self.images]
        self._recent.clear()
        self._reported = {i for i, entry in enumerate(self.entries) if "error" in entry}  # the build printed them

    def paths(self) -> list[Path]:
        """What to open: the folder itself, or each CSV row's ``path`` (relative to the CSV)."""
        return data_paths(self.source)

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records about its data."""
        kinds = [("dbt" if image.data.ndim == 3 else "ffdm") for image in self.images]
        out = {"source": str(self.source.resolve()), "images": len(kinds),
               "ffdm": kinds.count("ffdm"), "dbt": kinds.count("dbt"), "seed": self.seed,
               "unreadable": len(self.unopened) + sum("error" in entry for entry in self.entries)}
        if self.cache is not None:
            out["cache"] = self.cache.describe()
        return out

    def item_seed(self, epoch: int, index: int) -> int:
        return int(np.random.SeedSequence((self.seed, epoch, index)).generate_state(1)[0])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shuffled order of the images in ``epoch``."""
        return np.random.default_rng((self.seed, epoch, 0x5EED)).permutation(len(self.images))

    def __getitem__(self, key: tuple[int, int]) -> Item:
        """The sample of image ``index`` in ``epoch`` (``sample`` None when it has no tissue)."""
        epoch, index = key
        image = self.images[index]
        seed = self.item_seed(epoch, index)
        try:
            if image.data.ndim == 2:
                return Item(index, self.sampler.sample(*self._frame(index, 0), seed))
            i, j = self.sampler.choose_pair(image.data.shape[0], seed)
            (vi, ti), (vj, tj) = self._frame(index, i), self._frame(index, j)
            return Item(index, self.sampler.sample_slices((vi, vj), (ti, tj), (i, j), seed))
        except NoTissueError:
            return Item(index, None)
        except _Unreadable:
            return Item(index, None, unreadable=True)

    def _frame(self, index: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """MONOCHROME2 values and tissue mask of one frame: from the preprocessing cache when there is
        one (memory-mapped), else decoded and segmented (:func:`training.tissue.frame_and_tissue`)."""
        key = (index, frame)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        try:
            if self.cache is None:
                self._recent[key] = frame_and_tissue(self.images[index], frame)
            elif "error" in self.entries[index]:
                raise MammoInputError(self.entries[index]["error"])
            else:
                self._recent[key] = self.cache.frame(self.entries[index], frame)
        except Exception as exc:  # noqa: BLE001 - any decoder's error: one damaged file must not end a run
            self._report(index, frame, exc)
            raise _Unreadable from None
        while len(self._recent) > self.cache_frames:
            self._recent.popitem(last=False)
        return self._recent[key]

    def _report(self, index: int, frame: int, exc: Exception) -> None:
        """One stderr line per unreadable image and process (every draw of it is counted by the loop)."""
        if index in self._reported:
            return
        self._reported.add(index)
        path = self.images[index].meta.path
        reason = str(exc) if isinstance(exc, (MammoInputError, OSError)) else f"{type(exc).__name__}: {exc}"
        reason = " ".join(reason.split()).removeprefix(f"{path}: ")
        where = f" (frame {frame})" if self.images[index].data.ndim == 3 else ""
        print(f"mammodino: skipped {path}{where}: {reason}", file=sys.stderr)


class StepBatches(torch.utils.data.Sampler):
    """Batch keys ``[(epoch, index), ...]`` for steps ``start_step, start_step + 1, ...``: step ``s``
    takes positions ``s * B .. s * B + B - 1`` of the endless sequence of shuffled epochs."""

    def __init__(self, dataset: PretrainDataset, batch_size: int, start_step: int = 0,
                 end_step: int | None = None):
        self.dataset, self.batch_size = dataset, batch_size
        self.start_step, self.end_step = start_step, end_step

    def __len__(self) -> int:
        return max((self.end_step or 0) - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self.dataset)
        step = self.start_step
        orders: dict[int, np.ndarray] = {}
        while self.end_step is None or step < self.end_step:
            keys = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                epoch = position // n
                if epoch not in orders:
                    orders = {epoch: self.dataset.epoch_order(epoch)}
                keys.append((epoch, int(orders[epoch][position % n])))
            yield keys
            step += 1


def collate(items: Sequence[Item]) -> dict[str, Any]:
    """Stack samples into view-major tensors: ``global`` (G*B, 1, S, S), ``local`` (L*B, 1, s, s),
    ``masks`` (G*B, g, g) bool, ``dbt_pairs`` (P, 2) rows of ``global``, ``dbt_volumes`` (P,); also
    ``n_images`` (B), ``indices`` (dataset indices of the sampled items), ``skipped`` (dataset
    indices of the items without tissue) and ``unreadable`` (those that could not be read)."""
    kept = [item for item in items if item.sample is not None]
    views: list[dict[str, np.ndarray]] = []
    pair_slots: list[tuple[int, int, int]] = []  # (batch row of slice i, row of slice j, volume id)
    for item in kept:
        sample = item.sample
        if sample.pair is None:
            views.append(sample.views())
        else:
            pair_slots.append((len(views), len(views) + 1, item.index))
            views.append(sample.views(sample.pair[0]))
            views.append(sample.views(sample.pair[1]))
    batch = len(views)
    out: dict[str, Any] = {"n_images": batch, "indices": [item.index for item in kept],
                           "skipped": [item.index for item in items if item.sample is None and not item.unreadable],
                           "unreadable": [item.index for item in items if item.unreadable]}
    if batch == 0:
        return out
    # (B, V, ...) -> (V, B, ...) -> (V*B, ...): view-major rows.
    for name, channel in (("global", True), ("local", True), ("masks", False)):
        stacked = torch.from_numpy(np.stack([v[name] for v in views]).swapaxes(0, 1).copy())
        stacked = stacked.flatten(0, 1)
        out[name] = stacked.unsqueeze(1) if channel else stacked
    n_global = views[0]["global"].shape[0]
    pairs = [(v * batch + a, v * batch + b) for v in range(n_global) for a, b, _ in pair_slots]
    volumes = [vol for _ in range(n_global) for _, _, vol in pair_slots]
    out["dbt_pairs"] = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    out["dbt_volumes"] = torch.tensor(volumes, dtype=torch.long)
    return out


PREFETCH_BATCHES = 4  # per worker: rides over a slow draw (a DBT pair, a cache miss) without starving the step


def worker_options(num_workers: int) -> dict[str, Any]:
    """DataLoader settings that keep the step fed: workers that live for the whole run (no restart
    between iterators), :data:`PREFETCH_BATCHES` batches ahead each, one torch thread each."""
    if num_workers == 0:
        return {}
    return {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES, "worker_init_fn": _worker_init}


def _worker_init(_worker: int) -> None:
    """One torch thread per worker: each samples one item at a time, and torch's intra-op threads would
    only compete with the training step for the same cores. SIGTERM is ignored: schedulers (SLURM's
    scancel, systemd, ``pkill``) signal every process of a job, and a worker that died of it would crash
    the run before the training process, which handles SIGTERM, could save its checkpoint; the
    DataLoader still ends its workers when the run ends."""
    import signal

    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset: PretrainDataset, batch_size: int, start_step: int = 0, end_step: int | None = None,
           num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over the batches of steps ``start_step..end_step - 1``. It has its own generator so
    that making it never draws from torch's global RNG (a resumed run must see the same RNG stream)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(dataset, batch_size, start_step, end_step), collate_fn=collate,
        num_workers=num_workers, generator=torch.Generator().manual_seed(0), **worker_options(num_workers))
