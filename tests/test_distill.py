"""`mammodino distill` (VersaMammo stage 2) on 12 small phantoms: the distillation loss, a short run whose
loss falls, the student as an encoder everywhere (load_encoder, infer, probe features), exact resume,
SIGTERM, and one-line errors for a teacher that is not an encoder, an unknown student and a labels CSV
without targets."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, phantom_labels, terminated_when, write_csv
from training.checkpoint import load_tensors, read_metadata
from training.cli import main
from training.dicom.io import open_image
from training.evaluate.encoder import Encoder, load_encoder
from training.ssl.distill import Projector, distill_losses, to_grid
from training.ssl.student import build_student

TEACHER = ["--teacher", "random:tiny/16", "--teacher-resolution", "64"]
FAST = [*TEACHER, "--student", "mobilenetv3_small_100", "--resolution", "64", "--batch-size", "4",
        "--warmup-epochs", "0", "--lr", "3e-3", "--quiet", "--json"]
TERMS = {"step", "epoch", "total", "cls_distill_loss", "patch_distill_loss", "density_loss", "lesion_loss",
         "lesion_type_loss", "birads_loss", "lr", "images_per_s"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """12 FFDM phantoms 128 x 104 with density, lesion, lesion_type and birads labels."""
    return phantom_labels(tmp_path_factory.mktemp("distill") / "phantoms", 12)


def run_cli(*args: str) -> tuple[int, dict | None, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, json.loads(out.getvalue()) if code == 0 and out.getvalue().strip() else None, err.getvalue()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> tuple[Path, dict]:
    """A 6-epoch run (18 steps of 4 images)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code, report, err = run_cli("distill", "--labels", str(phantoms), "--out", str(run), "--epochs", "6", *FAST)
    assert code == 0, err
    return run, report


@torch.no_grad()
def test_the_distillation_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    torch.manual_seed(0)
    projector = Projector(8, 8)
    for linear in (projector.cls, projector.patch):
        linear.weight.copy_(torch.eye(8))
        linear.bias.zero_()
    cls, patches = torch.randn(3, 8), torch.randn(3, 5, 8)
    cls_term, patch_term = distill_losses(projector, cls, patches, cls, patches)
    assert float(cls_term) == pytest.approx(0, abs=1e-6) and float(patch_term) == pytest.approx(0, abs=1e-6)
    cls_term, patch_term = distill_losses(projector, cls, patches, 2.5 * cls, 4 * patches)  # cosine: no scale
    assert float(cls_term) == pytest.approx(0, abs=1e-6) and float(patch_term) == pytest.approx(0, abs=1e-6)
    cls_term, patch_term = distill_losses(projector, cls, patches, torch.randn(3, 8), torch.randn(3, 5, 8))
    assert float(cls_term) > 0.2 and float(patch_term) > 0.2
    cls_term, patch_term = distill_losses(projector, cls, patches, -cls, -patches)  # opposite: the maximum
    assert float(cls_term) == pytest.approx(2) and float(patch_term) == pytest.approx(2)
    # teacher patch maps: unchanged on the same grid; a constant map stays constant on a coarser one
    grid = np.random.default_rng(0).normal(size=(4, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(to_grid(grid, (4, 6)).numpy(), grid.reshape(-1, 3), rtol=1e-5, atol=1e-6)
    constant = np.ones((4, 6, 3), dtype=np.float32) * np.arange(3)
    np.testing.assert_allclose(to_grid(constant, (2, 3)).numpy(), np.ones((6, 3)) * np.arange(3), atol=1e-6)


def test_students_have_the_backbone_interface_encoders_use():
    cnn = build_student("mobilenetv3_small_100")
    assert cnn.config.patch_size == 32 and cnn.config.arch == "mobilenetv3_small_100" and cnn.blocks == []
    encoder = Encoder(cnn, resolution=96)
    values = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    prepared = encoder.prepare(values, np.ones_like(values, dtype=bool))
    assert prepared.pixels.shape == (96, 64) and prepared.grid == (3, 2)
    for kind in ("last", "rollout"):
        output = encoder.run(prepared, attention=kind)[0]  # a CNN: no attention, no crash
        assert output.attention is None and output.rollout is None
    assert output.patches.shape == (3, 2, cnn.config.embed_dim)
    np.testing.assert_allclose(output.cls, output.patches.reshape(6, -1).mean(0), rtol=1e-4, atol=1e-5)
    assert not encoder.has_attention and encoder.describe()["timm"] == "mobilenetv3_small_100"

    vit = Encoder(build_student("vit_tiny_patch16_224"), resolution=96)
    prepared = vit.prepare(values, np.ones_like(values, dtype=bool))
    output = vit.run(prepared, attention="rollout")[0]
    assert vit.has_attention and output.attention.shape == (3, *prepared.grid) == (3, 6, 4)
    np.testing.assert_allclose(output.attention.sum((1, 2)), 1, rtol=1e-5)
    assert output.rollout.shape == prepared.grid


def test_a_short_run_learns_and_logs_every_term(trained):
    run, report = trained
    assert report["status"] == "done" and report["step"] == report["total_steps"] == 18
    assert report["targets"]["lesion_type"] == ["calc", "mass", "none"] and report["images"] == 12
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(1, 19)) and all(TERMS <= set(row) for row in rows)
    assert [row["epoch"] for row in rows] == [e for e in range(6) for _ in range(3)]
    first, last = rows[:3], rows[-3:]
    for term in ("total", "cls_distill_loss", "patch_distill_loss"):
        assert np.mean([r[term] for r in last]) < 0.8 * np.mean([r[term] for r in first]), term
    assert rows[-1]["lr"] < rows[0]["lr"]  # the cosine schedule


def test_the_student_is_an_encoder_everywhere(trained, phantoms, tmp_path):
    run, _ = trained
    meta = read_metadata(run / "checkpoints" / "last.safetensors")
    assert meta["kind"] == "encoder" and meta["model"]["timm"] == "mobilenetv3_small_100"
    assert "optimizer" not in meta["distill"] and meta["distill"]["step"] == 18  # finished: no training state
    tensors, _ = load_tensors(run / "checkpoints" / "last.safetensors")
    assert not any(k.startswith(("optimizer.", "projector.")) for k in tensors)

    encoder = load_encoder(run)
    assert set(encoder.heads) == {"density", "lesion", "lesion_type", "birads"} and encoder.resolution == 64
    image = open_image(phantoms.parent / next(csv.DictReader(open(phantoms)))["path"])
    output = encoder.run(encoder.prepare_image(image), attention="last")[0]
    assert output.attention is None and list(output.predictions["lesion_type"]) == ["calc", "mass", "none"]
    assert sum(output.predictions["density"].values()) == pytest.approx(1, rel=1e-5)

    code, report, err = run_cli("infer", str(image.meta.path), "--checkpoint", str(run), "--out",
                                str(tmp_path / "maps"), "--json")
    assert code == 0, err
    assert report["predictions"]["lesion_type"] == pytest.approx(output.predictions["lesion_type"], abs=1e-5)
    assert report["attention_in_tissue"] is None and report["encoder"]["timm"] == "mobilenetv3_small_100"
    assert "attention.png" not in report["files"] and Path(report["files"]["pca.png"]).is_file()

    from training.evaluate.features import extract_features  # what `mammodino probe` runs

    features = extract_features(encoder, [image.meta.path], cache=False, progress=False)
    assert features.features.shape == (1, 2 * encoder.embed_dim)


def test_the_inference_widget_shows_a_cnn_student_without_attention(make_napari_viewer, tmp_path):
    from napari_mammodino.widgets.inference import InferenceWidget
    from training.evaluate.encoder import TaskHead, save_encoder

    student = build_student("mobilenetv3_small_100")
    heads = {"density": TaskHead(2 * student.config.embed_dim, ["A", "B", "C", "D"])}
    path = save_encoder(tmp_path / "student.safetensors", Encoder(student, heads, resolution=128))
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(REPO / "sample_data" / "exam" / "LCC.dcm"), plugin="napari-mammodino")
    widget = InferenceWidget(viewer)
    widget.use_checkpoint(str(path))
    (pca,) = widget.compute()  # the feature PCA alone, shown: no attention layer
    assert pca.name == f"{image.name} features PCA" and pca.visible and pca.data.shape[-1] == 3
    assert not widget.result.has_attention and set(widget.result.predictions["density"]) == {"A", "B", "C", "D"}
    text = widget.results.text()
    assert "mobilenetv3_small_100/32" in text and "no attention" in text and "density: " in text


def test_resume_continues_exactly(phantoms, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    options = ["--labels", str(phantoms), "--epochs", "2", *FAST]
    assert run_cli("distill", "--out", str(whole), *options)[0] == 0
    code, report, err = run_cli("distill", "--out", str(parts), "--max-steps", "4", *options)
    assert code == 0 and report["step"] == 4, err
    middle = read_metadata(parts / "checkpoints" / "last.safetensors")
    assert middle["distill"]["step"] == 4 and "optimizer" in middle["distill"]
    assert load_encoder(parts).heads  # a run's checkpoint loads as an encoder mid-run too
    code, report, err = run_cli("distill", "--out", str(parts), "--resume", *options)
    assert code == 0 and report["start_step"] == 4 and report["step"] == 6, err
    a, _ = load_tensors(whole / "checkpoints" / "last.safetensors")
    b, _ = load_tensors(parts / "checkpoints" / "last.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["total"] for r in metrics(whole)] == [r["total"] for r in metrics(parts)]
    code, _, err = run_cli("distill", "--out", str(parts), "--resume", *options)
    assert code == 2 and "finished" in err
    code, _, err = run_cli("distill", "--out", str(whole), *options)
    assert code == 2 and "already holds a run" in err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(phantoms, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "training", "distill", "--labels", str(phantoms), "--out", str(run),
               "--epochs", "10000", *FAST]
    code, stdout, stderr = terminated_when(run / "metrics.jsonl", command, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 0, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr
    report = json.loads(stdout)
    assert report["status"] == "cancelled" and 1 <= report["step"] < report["total_steps"]
    meta = read_metadata(report["checkpoint"])
    assert meta["distill"]["step"] == report["step"] == metrics(run)[-1]["step"] and "optimizer" in meta["distill"]


@pytest.mark.parametrize("problem", ["teacher is a CSV", "teacher is not safetensors", "unknown student",
                                     "no target column"])
def test_bad_inputs_exit_2_with_one_line(problem, phantoms, tmp_path):
    labels, teacher, student = phantoms, "random:tiny/16", "mobilenetv3_small_100"
    if problem == "teacher is a CSV":
        teacher = str(phantoms)
    elif problem == "teacher is not safetensors":
        teacher = str(tmp_path / "teacher.safetensors")
        Path(teacher).write_bytes(os.urandom(4096))
    elif problem == "unknown student":
        student = "no_such_network_b9"
    else:
        rows = [{"path": row["path"], "patient_id": row["patient_id"], "density": ""}
                for row in csv.DictReader(open(phantoms))]
        labels = write_csv(rows, phantoms.parent / "unlabelled.csv")
    code, _, err = run_cli("distill", "--labels", str(labels), "--out", str(tmp_path / "run"), "--teacher", teacher,
                           "--student", student, "--teacher-resolution", "64", "--resolution", "64", "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = {"teacher is a CSV": "--teacher must be an encoder", "teacher is not safetensors": "--teacher must be an "
                "encoder", "unknown student": "not a timm model name", "no target column": "no target to learn"}[problem]
    assert expected in err
    assert not (tmp_path / "run").exists()
