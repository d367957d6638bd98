"""The pretraining data path: the automatic preprocessing cache (built on the first run, reused, invalidated
by content and settings, shared safely by two builds), unreadable files skipped and counted, the loop's
data-wait timing, and exact resume through the default cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import write_fake_encapsulated
from pydicom.uid import RLELossless
from helpers import MICRO, SAMPLES, student_weights

import training.ssl.cache
import training.tissue
from training.ssl.cache import CacheSettings, FrameCache, build_cache, default_cache_dir
from training.checkpoint import read_metadata
from training.cli import main
from training.ssl.presets import load_config
from training.ssl.data import PretrainDataset
from training.labels import open_data_skipping
from training.dicom.image import MammoImage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def default_cache(tmp_path, monkeypatch) -> Path:
    """This test's default cache folder (never the user's ~/.cache)."""
    monkeypatch.setenv("MAMMODINO_CACHE", str(tmp_path / "mammodino_cache"))
    return tmp_path / "mammodino_cache" / "frames"


@pytest.fixture
def data(tmp_path) -> Path:
    """A folder with two FFDM views (copies: the tests change them)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("RCC", "LMLO"):
        shutil.copy(SAMPLES / "exam" / f"{name}.dcm", folder / f"{name}.dcm")
    return folder


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Paths of every frame decoded from now on."""
    calls: list[str] = []
    original = MammoImage.frame

    def counting(self, index=0):
        calls.append(self.meta.path)
        return original(self, index)

    monkeypatch.setattr(MammoImage, "frame", counting)
    return calls


def pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", "cpu-tiny", *sum((["--set", s] for s in MICRO), []), "--data", str(data),
            "--out", str(out), "--quiet", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_default_cache_is_built_on_the_first_run_and_reused_by_the_next(data, tmp_path, default_cache, decoded):
    assert default_cache_dir() == default_cache
    assert main(pretrain_args(data, tmp_path / "a", "--max-steps", "2")) == 0
    assert sorted(Path(p).name for p in decoded) == ["LMLO.dcm", "RCC.dcm"]  # each image once, while building
    arrays = sorted(default_cache.glob("*.npy"))
    assert len(arrays) == 4 and (default_cache / "index.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in arrays}
    meta = read_metadata(tmp_path / "a" / "checkpoints" / "last.safetensors")
    recorded = meta["data"]["cache"]
    assert recorded["automatic"] and recorded["folder"] == str(default_cache.resolve())
    assert recorded["settings"] == {"long_side": 1024, "spacing_mm": None}
    assert "--cache" not in meta["command"]
    decoded.clear()
    assert main(pretrain_args(data, tmp_path / "b", "--max-steps", "2")) == 0
    assert decoded == []  # nothing decoded: neither a rebuild nor a draw
    assert {p: p.stat().st_mtime_ns for p in sorted(default_cache.glob("*.npy"))} == stamps
    # --no-cache decodes (here each image once: the dataset's own LRU of 8 frames holds both)
    assert main(pretrain_args(data, tmp_path / "c", "--max-steps", "2", "--no-cache")) == 0
    assert sorted(Path(p).name for p in decoded) == ["LMLO.dcm", "RCC.dcm"]
    assert "cache" not in read_metadata(tmp_path / "c" / "checkpoints" / "last.safetensors")["data"]


def values_of(folder: Path, image: MammoImage, settings: CacheSettings = CacheSettings()) -> np.ndarray:
    cache = FrameCache(folder, settings)
    return np.array(cache.frame(cache.entry(image), 0)[0])


def test_a_changed_file_or_other_settings_rebuild_a_touched_file_does_not(data, default_cache, decoded, monkeypatch):
    def build(settings: CacheSettings = CacheSettings()) -> dict:
        images = PretrainDataset(data, load_config("cpu-tiny").sampler).images
        return build_cache(images, default_cache, settings, workers=1, fixed_settings=False)

    assert (build()["built"], len(decoded)) == (2, 2)
    path = data / "RCC.dcm"
    rcc = PretrainDataset(data, load_config("cpu-tiny").sampler).images[1]
    assert FrameCache(default_cache, CacheSettings()).entry(rcc)["files"][0][1:] == [
        path.stat().st_size, path.stat().st_mtime_ns, training.ssl.cache.file_digest(str(path))]
    before = values_of(default_cache, rcc)
    # same bytes, new modification time (a copy, a touch): hashed again, nothing decoded or written
    decoded.clear()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    report = build()
    assert (report["built"], report["reused"], report["rehashed"], decoded) == (0, 2, 1, [])
    # other pixels in a file of the same size (only its content tells): rebuilt, other arrays
    content = bytearray(path.read_bytes())
    content[-300_000:-200_000] = bytes(100_000)  # a band of the pixel data set to 0
    path.write_bytes(bytes(content))
    report = build()
    assert (report["built"], report["reused"]) == (1, 1) and [Path(p).name for p in decoded] == ["RCC.dcm"]
    assert not np.array_equal(values_of(default_cache, rcc), before)
    # other settings: entries of their own beside the first ones, which stay valid
    other = build(CacheSettings(long_side=64))
    assert other["built"] == 2 and values_of(default_cache, rcc, CacheSettings(long_side=64)).shape == (64, 52)
    assert build()["built"] == 0
    # another preprocessing version (the format, or a tissue segmentation parameter): rebuilt
    with monkeypatch.context() as patch:
        patch.setattr(training.ssl.cache, "FORMAT", training.ssl.cache.FORMAT + 1)
        assert build()["built"] == 2
    with monkeypatch.context() as patch:
        patch.setattr(training.tissue, "AIR_TO_TISSUE", training.tissue.AIR_TO_TISSUE + 0.01)
        assert build()["built"] == 2


def test_an_unreadable_file_is_skipped_and_counted(data, tmp_path, capfd):
    bad = data / "broken.dcm"
    bad.write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI" + bytes(40))  # a DICOM marker, no header
    undecodable = write_fake_encapsulated(data / "rle.dcm", RLELossless)  # opens; its frame cannot decode
    images, skipped = open_data_skipping(data)
    err = capfd.readouterr().err
    assert len(images) == 3 and [Path(p).name for p, _ in skipped] == ["broken.dcm"]
    assert f"mammodino: skipped {bad}: " in err and len(err.strip().splitlines()) == 1
    # the cache build skips the frame that does not decode, counts it and goes on
    assert main(pretrain_args(data, tmp_path / "run", "--max-steps", "3")) == 0
    err = capfd.readouterr().err
    assert f"mammodino: skipped {undecodable}: " in err and "Unable to decode" in err
    meta = read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert meta["data"]["images"] == 3 and meta["data"]["unreadable"] == 2  # one not opened, one not decoded
    lines = metrics(tmp_path / "run")
    assert lines[-1]["unreadable"] == 4 and lines[-1]["unreadable_images"] == 1  # 12 draws of 3 images
    assert lines[-1]["skipped"] == 0  # not counted as an image without tissue
    # decoding at sample time, in a DataLoader worker: the same, never an exception out of the worker
    assert main(pretrain_args(data, tmp_path / "plain", "--max-steps", "3", "--no-cache",
                              "--set", "train.num_workers=1")) == 0
    assert metrics(tmp_path / "plain")[-1]["unreadable"] == 4
    assert f"mammodino: skipped {undecodable}: " in capfd.readouterr().err


def test_every_metrics_line_times_the_data_wait_and_the_step(data, tmp_path):
    assert main(pretrain_args(data, tmp_path / "run", "--max-steps", "3", "--set", "train.num_workers=1")) == 0
    for line in metrics(tmp_path / "run"):
        assert 0 <= line["data_wait_s"] <= line["step_s"] and line["images_per_s"] > 0
        assert line["images_per_s"] == pytest.approx(4 / line["step_s"], rel=1e-6)


def test_a_run_on_the_default_cache_resumes_through_it_to_the_uninterrupted_weights(data, tmp_path, decoded):
    labels = tmp_path / "labels.csv"
    rows = [data / "RCC.dcm", SAMPLES / "dbt" / "LCC_dbt.dcm"]
    labels.write_text("path\n" + "".join(f"{os.path.relpath(r, tmp_path)}\n" for r in rows))
    config = load_config("cpu-tiny", MICRO)
    assert main(pretrain_args(labels, tmp_path / "split", "--max-steps", "2")) == 0
    decoded.clear()
    assert main(pretrain_args(labels, tmp_path / "split", "--max-steps", "4", "--resume")) == 0
    assert decoded == []  # the resumed run read the default cache
    from training.ssl.pretrain import pretrain

    pretrain(config, labels, tmp_path / "straight", max_steps=4, progress=False)
    straight, resumed = student_weights(tmp_path / "straight"), student_weights(tmp_path / "split")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    assert read_metadata(tmp_path / "split" / "checkpoints" / "last.safetensors")["data"]["cache"]["automatic"]


BUILD = """
import sys
from training.ssl.cache import CacheSettings, build_cache
from training.labels import open_data
images = [im for im in open_data(sys.argv[1]) if im.meta.path.endswith(tuple(sys.argv[3:]))]
print(build_cache(images, sys.argv[2], CacheSettings(long_side=64), workers=1, fixed_settings=False)["built"])
"""


def test_two_builds_of_one_cache_at_once_leave_every_entry_readable(data, tmp_path, default_cache):
    shutil.copy(SAMPLES / "exam" / "LCC.dcm", data / "LCC.dcm")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two runs on overlapping data, started together: RCC is built by both, LMLO and LCC by one each
    processes = [subprocess.Popen([sys.executable, "-c", BUILD, str(data), str(default_cache), *names], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for names in (["RCC.dcm", "LMLO.dcm"], ["RCC.dcm", "LCC.dcm"])]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    cache = FrameCache(default_cache, CacheSettings(long_side=64))
    images = PretrainDataset(data, load_config("cpu-tiny").sampler).images
    assert len(cache.entries) == 3  # the index merged both builds' entries
    for image in images:
        values, tissue = cache.frame(cache.entry(image), 0)
        assert values.shape == tissue.shape == (64, 52) and tissue.any()
    assert not list(default_cache.glob(".*.tmp"))  # no temporary file left behind
