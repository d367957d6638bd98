"""The one-command training recipe (``scripts/train_release_encoder.sh``) in its CPU smoke mode: corpus,
cache, both pretraining stages (the second started ``--from`` the first), heads, evaluation against random
init and the model card, end to end on a tiny corpus. The numbers of a smoke run mean nothing; what a user
checks is that every step ran and that the encoder it wrote loads everywhere with its card."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from training.checkpoint import read_header, read_metadata

REPO = Path(__file__).resolve().parents[1]
DDSM = REPO.parent / "shared" / "data" / "ddsm_tissue66" / "train_valid" / "fgt_seg"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    if not DDSM.is_dir():
        pytest.skip(f"the real DDSM films are not at {DDSM} (shared/data is outside the repo)")
    root = tmp_path_factory.mktemp("smoke")
    # A small real collection: 16 DDSM films (links, not copies) under a data root of their own.
    films = root / "data" / "ddsm_tissue66"
    for part in ("fgt_seg", "fgt_seg_labels"):
        (films / "train_valid" / part).mkdir(parents=True)
    for image in sorted(DDSM.glob("*.png"))[:16]:
        (films / "train_valid" / "fgt_seg" / image.name).symlink_to(image)
        label = DDSM.parent / "fgt_seg_labels" / f"{image.stem}_LI.png"
        (films / "train_valid" / "fgt_seg_labels" / label.name).symlink_to(label)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAMMODINO_CACHE": str(root / "user-cache")}
    done = subprocess.run(["bash", "scripts/train_release_encoder.sh", "--recipe", "smoke", "--work", str(root / "work"),
                           "--data-root", str(root / "data")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "work"


def test_smoke_recipe_runs_every_stage(smoke):
    corpus = json.loads((smoke / "corpus.report.json").read_text())
    assert corpus["splits"]["pretrain"]["real"] > 0 and corpus["splits"]["heldout"]["images"] > 0
    assert json.loads((smoke / "cache.report.json").read_text())["images"] == corpus["splits"]["pretrain"]["images"]
    first = read_metadata(smoke / "stage1" / "checkpoints" / "last.safetensors")
    second = read_metadata(smoke / "stage2" / "checkpoints" / "last.safetensors")
    assert first["step"] == 2 and second["step"] == 2
    assert second["init_from"]["step"] == 2 and Path(second["init_from"]["path"]).parent.parent == smoke / "stage1"
    assert second["config"]["sampler"]["global_size"] > first["config"]["sampler"]["global_size"]
    lines = [json.loads(line) for line in (smoke / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("kind") == "eval" for line in lines), "the learning curve was not written"


def test_smoke_encoder_loads_with_its_card(smoke):
    from training.evaluate.encoder import load_encoder

    path = smoke / "mammodino-smoke.safetensors"
    assert {e["dtype"] for k, e in read_header(path).items() if k != "__metadata__"} == {"F16"}
    meta = read_metadata(path)
    assert meta["preprocess"]["resolution"] >= 448
    assert meta["preprocess"]["resolution"] // meta["model"]["patch_size"] >= 28
    assert [s["name"] for s in meta["training"]["stages"]] == ["stage1", "stage2"]
    speed = meta["throughput"]
    assert speed["images_per_s"] > 0 and speed["flops_per_image"] > 1e8 and speed["mfu"] is None  # no GPU here
    evaluation = meta["evaluation"]
    assert set(evaluation["trained"]) == set(evaluation["random_init"])
    assert 0 <= evaluation["trained"]["cbis_attention_in_tissue"] <= 1
    encoder = load_encoder(path)
    fitted = {name for name, report in meta["head_validation"].items() if "error" not in report}
    assert fitted, meta["head_validation"]  # a tiny corpus may lack a class for some head, not for all
    assert set(encoder.heads) == {"lesion_heatmap" if name == "lesion_mask" else name for name in fitted}
    card = (smoke / "mammodino-smoke.md").read_text()
    assert "random init" in card and f"{speed['images_per_s']:.1f}" in card
    assert "scripts/train_release_encoder.sh --recipe smoke" in card
    state = read_metadata(smoke / "mammodino-smoke-state.safetensors")  # what another machine continues from
    assert state["kind"] == "pretraining-state" and state["step"] == 2


def test_mfu_is_worked_out_from_the_accelerator_a_run_recorded():
    """A run trained on a lent GPU and evaluated elsewhere still gets its model-FLOPs utilisation."""
    from training.ssl.throughput import mfu, peak_flops_of

    assert peak_flops_of("cuda: NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops_of("cuda: NVIDIA H100 80GB HBM3", "fp32") == 67e12
    assert peak_flops_of("cpu: x86_64, 2 cores", "bf16") is None
    assert mfu(50e9, 1000.0, peak_flops_of("cuda: NVIDIA H200", "bf16")) == pytest.approx(50e12 / 989.4e12)
