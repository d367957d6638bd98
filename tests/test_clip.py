"""Image-report pretraining (`mammodino clip`), zero-shot (`mammodino zeroshot`) and attribute maps: a
short run's loss falls, resume continues exactly, the file is an encoder and a CLIP model at once,
zero-shot density beats chance on phantoms the model never saw, the label-efficiency curve is
reported, maps sit on the image grid, and bad input is one line with exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SAMPLES, write_csv
from training.checkpoint import load_tensors, read_metadata, unprefixed
from training.cli import main
from training.errors import MammoInputError
from training.evaluate.encoder import DEMO_CHECKPOINT, load_encoder
from training.ssl.clip import has_text_tower, load_clip
from training.ssl.clip_train import ClipConfig, read_pairs, train_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(width=32, depth=1, heads=2, embed_dim=32, max_length=48)


@pytest.fixture(scope="module")
def densities(tmp_path_factory) -> Path:
    """Small FFDM phantoms of every density, 10 of each: `train.csv` (7 a class) and `test.csv` (3)."""
    import csv

    from training.phantom.dataset import generate

    root = tmp_path_factory.mktemp("clip")
    train, test = [], []
    for k, density in enumerate("ABCD"):
        generate(root / density, "ffdm", 10, seed=40 + k, density=density, shape=(128, 104), progress=False)
        with open(root / density / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(rows):
            row = {**row, "path": f"{density}/{row['path']}", "patient_id": f"{density}-{row['patient_id']}"}
            for column in ("lesion_mask", "breast_mask", "glandular_mask"):
                if row.get(column):
                    row[column] = f"{density}/{row[column]}"
            (train if i < 7 else test).append(row)
    write_csv(train, root / "train.csv")
    write_csv(test, root / "test.csv")
    return root


@pytest.fixture(scope="module")
def trained(densities, tmp_path_factory) -> Path:
    """A CLIP run on the training phantoms over the frozen demo encoder."""
    out = tmp_path_factory.mktemp("cliprun") / "run"
    train_clip(densities / "train.csv", out, ClipConfig(steps=150, batch_size=16, lr=2e-3, warmup_steps=10,
                                                         save_every=50, **SMALL), progress=False)
    return out


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_learns_and_its_file_is_an_encoder_and_a_clip_model(trained):
    losses = _losses(trained)
    assert len(losses) == 150
    assert np.mean(losses[-20:]) < 0.8 * np.mean(losses[:20])
    last = trained / "checkpoints" / "last.safetensors"
    meta = read_metadata(last)
    assert meta["kind"] == "encoder" and meta["step"] == 150
    assert "[PAD]" in meta["clip"]["tokenizer"]  # the tokenizer travels in the metadata
    encoder = load_encoder(last)
    demo = load_encoder(DEMO_CHECKPOINT)
    for name, value in demo.backbone.state_dict().items():  # frozen: the image side is the demo's
        assert torch.equal(value, encoder.backbone.state_dict()[name]), name
    clip = load_clip(trained)
    assert clip.text_embeddings(["There is a mass."]).shape == (1, 32)
    assert has_text_tower(last) and not has_text_tower(DEMO_CHECKPOINT)


def test_the_image_weights_are_inside_the_file(trained, tmp_path):
    """No path in the checkpoint is needed to load it (Mammo-CLIP's users hit hard-coded paths)."""
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes((trained / "checkpoints" / "last.safetensors").read_bytes())
    clip = load_clip(moved)
    tensors, _ = load_tensors(moved)
    assert unprefixed("backbone", tensors)
    assert clip.encoder.embed_dim == clip.head.image_cls.in_features


def test_zero_shot_density_beats_chance_on_phantoms_it_never_saw(trained, densities, capsys):
    code = main(["zeroshot", "--labels", str(densities / "test.csv"), "--target", "density",
                 "--checkpoint", str(trained), "--json", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 12 and report["classes"] == ["A", "B", "C", "D"]
    assert report["auroc"] > 0.6, report
    assert set(report["prompts"]) == {"A", "B", "C", "D"}


def test_the_label_efficiency_curve_compares_clip_with_the_image_features(trained, densities, capsys):
    code = main(["zeroshot", "--labels", str(densities / "train.csv"), "--target", "density", "--checkpoint",
                 str(trained), "--curve", "--repeats", "2", "--group", "patient_id", "--json", "--quiet"])
    assert code == 0
    curve = json.loads(capsys.readouterr().out)["label_efficiency"]
    assert curve["fractions"] == [0.01, 0.1, 1.0]
    for name in ("clip", "image_encoder"):
        full = curve["auroc"][name]["1.0"]
        assert full["n"] >= 1 and 0.0 <= full["mean"] <= 1.0
    assert curve["train_images"]["0.01"] < curve["train_images"]["1.0"]


def test_resume_continues_exactly(tmp_path):
    config = ClipConfig(steps=8, batch_size=4, save_every=4, **SMALL)
    straight, halted = tmp_path / "straight", tmp_path / "halted"
    train_clip(SAMPLES / "labels.csv", straight, config, progress=False)
    train_clip(SAMPLES / "labels.csv", halted, config, max_steps=4, progress=False)
    summary = train_clip(SAMPLES / "labels.csv", halted, resume=True, progress=False)
    assert summary["start_step"] == 4 and summary["step"] == 8
    a, _ = load_tensors(straight / "checkpoints" / "last.safetensors")
    b, _ = load_tensors(halted / "checkpoints" / "last.safetensors")
    for name in unprefixed("clip", a):
        assert torch.equal(a[f"clip.{name}"], b[f"clip.{name}"]), name
    assert _losses(straight) == _losses(halted)


def test_stopping_saves_a_checkpoint(tmp_path):
    asked = iter([False, False, True])
    summary = train_clip(SAMPLES / "labels.csv", tmp_path / "run", ClipConfig(steps=50, batch_size=4, **SMALL),
                         should_stop=lambda: next(asked, True), progress=False)
    assert summary["step"] == 3 and summary["terminated"] is False
    assert read_metadata(tmp_path / "run" / "checkpoints" / "last.safetensors")["step"] == summary["step"]


def test_reports_come_from_a_report_column_or_the_templates(tmp_path):
    rows = [{"path": os.path.relpath(SAMPLES / "exam" / f"{v}.dcm", tmp_path), "report": f"{v} view, no mass.",
             "patient_id": "p", "laterality": v[0]} for v in ("RCC", "LCC", "RMLO")]
    given = read_pairs(write_csv(rows, tmp_path / "reports.csv"))
    assert given.texts == [["RCC view, no mass."], ["LCC view, no mass."], ["RMLO view, no mass."]]
    assert given.breasts[0] == given.breasts[2] != given.breasts[1]
    written = read_pairs(SAMPLES / "labels.csv", variants=3)
    assert all(len(t) == 3 for t in written.texts)
    assert len({t for variants in written.texts for t in variants}) > len(written)  # other words per seed
    rows[1]["path"] = "nowhere.dcm"
    with pytest.raises(MammoInputError, match="does not exist"):
        read_pairs(write_csv(rows, tmp_path / "missing.csv"))
    rows[1] = {**rows[0], "report": " "}
    with pytest.raises(MammoInputError, match="empty"):
        read_pairs(write_csv(rows, tmp_path / "blank.csv"))


def test_views_of_one_breast_share_a_breast_id():
    pairs = read_pairs(SAMPLES / "labels.csv", variants=1)
    rows = {key: i for i, key in enumerate(pairs.keys)}
    assert pairs.breasts[rows["exam/RCC.dcm"]] == pairs.breasts[rows["exam/RMLO.dcm"]]
    assert pairs.breasts[rows["exam/RCC.dcm"]] != pairs.breasts[rows["exam/LCC.dcm"]]


def test_attribute_maps_lie_on_the_image_grid(trained):
    from training.dicom.io import open_image
    from training.evaluate.attribute_maps import find, patch_coverage

    clip = load_clip(trained)
    found = find(clip, open_image(SAMPLES / "exam" / "RCC.dcm"), "spiculated mass in the upper outer quadrant")
    assert found.scores.shape == found.prepared.grid
    # the map reads the sentence against a normal breast: the sentence's own map, minus the reference's
    from training.evaluate.attribute_maps import REFERENCE, map_direction

    output = clip.encoder.run(found.prepared, attention="none")[0]
    sentence = "spiculated mass in the upper outer quadrant"
    expected = clip.patch_scores(output, map_direction(clip, sentence, None)) - \
        clip.patch_scores(output, map_direction(clip, REFERENCE, None))
    np.testing.assert_allclose(found.scores, expected, atol=1e-4)
    assert found.on_image().shape == found.prepared.image_shape
    assert set(found.probabilities) == {"density", "lesion_type"}
    assert abs(sum(found.probabilities["density"].values()) - 1) < 1e-3
    # patch coverage: a mask over exactly one patch's footprint covers that patch only
    p = found.prepared
    mask = np.zeros(p.image_shape, bool)
    r0, c0 = int(np.ceil(p.box[0] + 2 * p.patch_px[0])), int(np.ceil(p.box[1] + 3 * p.patch_px[1]))
    mask[r0:r0 + 2, c0:c0 + 2] = True
    covered = patch_coverage(mask, p)
    assert covered[2, 3] > 0 and (covered > 0).sum() == 1


def test_the_pointing_game_reports_clip_attention_and_random(trained):
    from training.evaluate.attribute_maps import pointing_game

    report = pointing_game(load_clip(trained), SAMPLES / "labels.csv", progress=False)
    assert report["images"] >= 1
    assert 0 <= report["random"] < 0.5
    for name in ("clip", "clip_without_reference", "attention"):
        assert 0 <= report[name] <= 1
    assert report["reference"].startswith("No mass")
    assert set(report["by_type"]) <= {"mass", "calc"}


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "--labels", "LABELS", "--target", "density", "--checkpoint", "DEMO"], "no text tower"),
    (["zeroshot", "--labels", "LABELS", "--target", "density", "--prompts", "EMPTY"], "non-empty"),
    (["zeroshot", "--labels", "LABELS", "--target", "nonsense"], "no such column"),
    (["clip", "--data", "UNKNOWN", "--out", "OUT"], "report template"),
    (["clip", "--data", "LABELS", "--out", "OUT", "--batch-size", "1"], "at least 2"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"density": {"A": ["a"], "B": [""], "C": ["c"], "D": ["d"]}}))
    unknown = write_csv([{"path": "../sample_data/exam/RCC.dcm", "colour": "blue"}], tmp_path / "unknown.csv")
    (tmp_path / "x").mkdir()
    values = {"LABELS": str(SAMPLES / "labels.csv"), "DEMO": str(DEMO_CHECKPOINT), "EMPTY": str(prompts),
              "UNKNOWN": str(unknown), "OUT": str(tmp_path / "out")}
    argv = [values.get(a, a) for a in argv]
    if argv[0] == "zeroshot" and "--checkpoint" not in argv:
        argv += ["--checkpoint", str(trained)]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_empty_text_is_one_line(trained):
    clip = load_clip(trained)
    with pytest.raises(MammoInputError, match="empty"):
        clip.text_embeddings(["  "])


def test_the_help_states_the_trainer_defaults():
    from dataclasses import asdict

    from training.ssl.commands import CLIP_DEFAULTS

    defaults = asdict(ClipConfig())
    assert {k: defaults[k] for k in CLIP_DEFAULTS} == CLIP_DEFAULTS


def test_infer_finds_a_sentence_headless(trained, tmp_path, capsys):
    code = main(["infer", str(SAMPLES / "exam" / "RCC.dcm"), "--checkpoint", str(trained), "--out", str(tmp_path),
                 "--find", "There is a mass.", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["find"]["sentence"] == "There is a mass." and set(report["find"]["probabilities"]) == {
        "density", "lesion_type"}
    from training.dicom.io import open_image

    stored = np.load(report["find"]["file"])
    assert stored.shape == open_image(SAMPLES / "exam" / "RCC.dcm").data.shape
    assert np.count_nonzero(stored) > 0
    assert (tmp_path / "predictions.json").is_file()  # the encoder's maps as without --find
    demo_encoder = main(["infer", str(SAMPLES / "exam" / "RCC.dcm"), "--checkpoint", str(DEMO_CHECKPOINT),
                         "--out", str(tmp_path / "x"), "--find", "mass"])
    assert demo_encoder == 2 and "no text tower" in capsys.readouterr().err
    assert not (tmp_path / "x" / "predictions.json").exists()
