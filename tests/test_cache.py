"""The pretraining preprocessing cache: built once (in parallel with dask), reused, rebuilt when a source
changes, memory-mapped by the dataset with the sampler's semantics, and used by `mammodino pretrain --cache`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import write_enhanced_dbt, write_ffdm
from helpers import MICRO, SAMPLES

from training.ssl.cache import CacheSettings, FrameCache, build_cache
from training.checkpoint import read_metadata
from training.cli import main
from training.ssl.presets import load_config
from training.ssl.data import PretrainDataset, StepBatches, collate
from training.errors import MammoInputError
from training.dicom.io import open_image


@pytest.fixture(autouse=True)
def own_default_cache(tmp_path, monkeypatch):
    """Runs without --cache build the default cache: here, never in the user's ~/.cache."""
    monkeypatch.setenv("MAMMODINO_CACHE", str(tmp_path / "default_cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A folder with an FFDM view, a MONOCHROME1 view (copies: tests change them) and a multi-frame DBT
    volume of 6 slices (the middle of the sample volume)."""
    folder = tmp_path_factory.mktemp("cache_data")
    for name in ("exam/RCC.dcm", "monochrome1/RCC.dcm"):
        shutil.copy(SAMPLES / name, folder / name.replace("/", "_"))
    volume = np.asarray(open_image(SAMPLES / "dbt" / "LCC_dbt.dcm").data[18:24])
    write_enhanced_dbt(folder / "dbt.dcm", volume, spacing=(0.71, 0.71), view="CC", laterality="L")
    return folder


@pytest.fixture(scope="module")
def small_cache(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "c"
    build_cache(data, folder, CacheSettings(long_side=128), workers=1)
    return folder


def arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def test_entries_hold_downsampled_monochrome2_values_and_tissue_masks(small_cache):
    cache = FrameCache(small_cache)
    entries = sorted(cache.entries.values(), key=lambda e: e["source"])
    assert [(e["kind"], e["frames"], e["photometric"]) for e in entries] == [
        ("dbt", 6, "MONOCHROME2"), ("ffdm", 1, "MONOCHROME2"), ("ffdm", 1, "MONOCHROME1")]
    dbt, ffdm, mono1 = entries
    assert ffdm["source_shape"] == [640, 520] and ffdm["shape"] == [128, 104]  # long side 128
    assert ffdm["spacing_mm"] == pytest.approx([1.6, 1.6])  # 0.32 mm x 5
    assert dbt["shape"] == [128, 104] and np.load(small_cache / dbt["values"], mmap_mode="r").shape == (6, 128, 104)
    values, tissue = cache.frame(ffdm, 0)
    assert isinstance(values, np.memmap) and values.dtype == np.uint16 and tissue.dtype == bool
    assert 0.2 < tissue.mean() < 0.6 and ffdm["tissue_fraction"] == [pytest.approx(float(tissue.mean()))]
    # tissue is bright in both: the MONOCHROME1 copy of the same view was inverted
    inverted, tissue1 = cache.frame(mono1, 0)
    assert values[tissue].mean() > values[~tissue].mean() and inverted[tissue1].mean() > inverted[~tissue1].mean()
    np.testing.assert_array_equal(tissue, tissue1)


def test_building_twice_reuses_and_a_changed_file_is_rebuilt(data, small_cache, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(small_cache, folder)
    before = arrays(folder)
    again = build_cache(data, folder, workers=1)  # the folder's settings are kept
    assert (again["built"], again["reused"], again["settings"]["long_side"]) == (0, 3, 128)
    changed = data / "exam_RCC.dcm"
    original, stat = changed.read_bytes(), changed.stat()
    try:
        pixels = np.zeros((640, 520), np.uint16)
        pixels[100:500, :300] = 3000  # another image at the same path
        write_ffdm(changed, pixels, spacing=(0.32, 0.32))
        report = build_cache(data, folder, workers=1)
        assert (report["built"], report["reused"]) == (1, 2)
        after = arrays(folder)
        differ = sorted(name for name in before if not np.array_equal(before[name], after[name]))
        key = FrameCache(folder).entry(PretrainDataset(data, load_config("cpu-tiny").sampler).images[1])["key"]
        assert differ == [f"{key}.tissue.npy", f"{key}.values.npy"]
        with pytest.raises(MammoInputError, match="built with"):
            build_cache(data, folder, CacheSettings(long_side=256), workers=1)
    finally:
        changed.write_bytes(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as it was: the other tests' cache holds it
    with pytest.raises(MammoInputError, match="missing or changed"):  # the copy holds the other image: stale
        PretrainDataset(data, load_config("cpu-tiny").sampler, cache=folder)


def test_parallel_build_equals_serial_build(data, small_cache, tmp_path):
    report = build_cache(data, tmp_path / "p", CacheSettings(long_side=128), workers=2)
    assert report["built"] == 3
    serial, parallel = arrays(small_cache), arrays(tmp_path / "p")
    assert serial.keys() == parallel.keys()
    for name in serial:
        np.testing.assert_array_equal(parallel[name], serial[name])
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index == json.loads((small_cache / "index.json").read_text())


def test_batches_from_the_cache_have_the_same_shapes_and_tissue_only_crops(data, small_cache, tmp_path):
    config = load_config("cpu-tiny", MICRO)
    plain = PretrainDataset(data, config.sampler, seed=3)
    cached = PretrainDataset(data, config.sampler, seed=3, cache=small_cache)
    keys = next(iter(StepBatches(plain, 3, start_step=2)))
    a, b = collate([plain[k] for k in keys]), collate([cached[k] for k in keys])
    for name in ("global", "local", "masks", "dbt_pairs", "dbt_volumes"):
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
    assert torch.equal(a["dbt_pairs"], b["dbt_pairs"])
    crops = [crop for key in keys for crop in cached[key].sample.crops]
    assert all(crop.tissue_fraction >= config.sampler.min_tissue for crop in crops if not crop.fallback)
    assert sum(crop.fallback for crop in crops) <= len(crops) // 10
    # without downsampling the crops are the DICOM's up to the 16-bit quantisation
    build_cache(plain.images, tmp_path / "full", CacheSettings(long_side=4096), workers=1)
    full = collate([PretrainDataset(data, config.sampler, seed=3, cache=tmp_path / "full")[k] for k in keys])
    for name in ("global", "local"):
        torch.testing.assert_close(full[name], a[name], rtol=0, atol=1e-3)
    assert torch.equal(full["masks"], a["masks"])


def test_pretrain_with_cache_builds_it_reads_it_and_never_decodes(data, tmp_path, monkeypatch, capsys):
    from training.dicom.image import MammoImage

    run, cache = tmp_path / "run", str(tmp_path / "c")
    base = ["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []), "--data", str(data),
            "--out", str(run), "--quiet", "--cache", cache]
    original = MammoImage.frame
    decoded: list[str] = []

    def counting(self, index=0):
        decoded.append(self.meta.path)
        return original(self, index)

    monkeypatch.setattr(MammoImage, "frame", counting)
    assert main(base + ["--max-steps", "2"]) == 0  # MICRO has train.num_workers=0: built in this process
    assert len(decoded) == 1 + 1 + 6  # each frame once, while building
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["data"]["cache"]["settings"] == {"long_side": 1024, "spacing_mm": None}
    assert "--cache" in meta["command"]
    decoded.clear()
    assert main(base + ["--max-steps", "4", "--resume"]) == 0
    assert decoded == []  # the resumed run reads the cache only
    assert read_metadata(run / "checkpoints" / "last.safetensors")["step"] == 4
    decoded.clear()
    assert main(base[:-2] + ["--max-steps", "5", "--resume"]) == 0  # no option: follows the run's --cache
    assert decoded == [] and not (tmp_path / "default_cache").exists()
    capsys.readouterr()
    assert main(base[:-2] + ["--no-cache", "--max-steps", "6", "--resume"]) == 2  # decoding: other batches
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cache" in err, err


@pytest.mark.skipif(importlib.util.find_spec("distributed") is not None, reason="distributed is installed")
def test_a_scheduler_address_without_distributed_is_one_line(data, tmp_path, capsys):
    code = main(["cache", "--data", str(data), "--out", str(tmp_path / "c"), "--scheduler", "tcp://127.0.0.1:8786",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install distributed" in err, err


def test_cache_command_reports_json(data, tmp_path, capsys):
    assert main(["cache", "--data", str(data), "--out", str(tmp_path / "c"), "--long-side", "64", "--workers", "1",
                 "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["built"] == 3 and report["frames"] == 8
    assert report["settings"] == {"long_side": 64, "spacing_mm": None}
    assert sorted(os.listdir(tmp_path / "c"))[-1] == "index.json"
