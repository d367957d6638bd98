"""Report sentences from attribute labels (training/ssl/reports.py): every attribute said, negatives where
the truth is complete, the same facts in other words across seeds, lesion positions read as a radiologist
reads a CC and an MLO, CBIS-DDSM rows, and one-line errors for unknown values and malformed templates."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import SAMPLES, write_csv
from training.errors import MammoInputError
from training.ssl.reports import (available_templates, combine_regions, image_seed, lesion_position,
                                  load_templates, report_sentences, reports_for_csv)

ROWS, COLS, NIPPLE_ROW, DEPTH, HALF = 200, 160, 100, 120, 80  # a synthetic breast outline, chest wall at column 0


def breast(chest_wall: str = "left", tilt_deg: float = 0.0, centre_row: float = NIPPLE_ROW) -> np.ndarray:
    """A half ellipse on the chest wall: DEPTH px to the nipple along an axis ``tilt_deg`` below the horizontal."""
    r, c = np.mgrid[:ROWS, :COLS] + 0.5
    t = math.radians(tilt_deg)
    along, across = (r - centre_row) * math.sin(t) + c * math.cos(t), (r - centre_row) * math.cos(t) - c * math.sin(t)
    mask = (along / DEPTH) ** 2 + (across / HALF) ** 2 < 1
    return mask[:, ::-1] if chest_wall == "right" else mask


def box(rows: tuple[int, int], cols: tuple[int, int], chest_wall: str = "left") -> list[int]:
    """A box given with the chest wall on the left, as stored for ``chest_wall``."""
    c0, c1 = cols if chest_wall == "left" else (COLS - cols[1], COLS - cols[0])
    return [rows[0], c0, rows[1], c1]


def said(report: str, templates, field: str, raw: str) -> bool:
    """Whether ``report`` states ``raw`` of ``field`` in one of the template's phrasings."""
    return any(p.lower() in report.lower() for p in templates.fields[field].values[raw.casefold()])


# --- geometry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("chest_wall", ["left", "right"])
def test_lesion_position_reads_cc_and_mlo_views(chest_wall):
    mask = breast(chest_wall)
    where = {  # (rows, cols with the chest wall on the left) -> CC reading, MLO reading
        ((40, 50), (50, 60)): (("outer", "middle"), ("upper", "middle")),  # above the nipple line
        ((150, 160), (50, 60)): (("inner", "middle"), ("lower", "middle")),
        ((40, 50), (10, 20)): (("outer", "posterior"), ("upper", "posterior")),  # near the chest wall
        ((140, 150), (85, 95)): (("inner", "anterior"), ("lower", "anterior")),
        ((95, 105), (50, 60)): (("central", "middle"), ("central", "middle")),  # on the nipple line
        ((95, 105), (100, 110)): (("retroareolar", "anterior"), ("retroareolar", "anterior")),
    }
    for (rows, cols), (cc, mlo) in where.items():
        assert lesion_position(box(rows, cols, chest_wall), "CC", chest_wall, mask) == cc, (rows, cols)
        assert lesion_position(box(rows, cols, chest_wall), "MLO", chest_wall, mask) == mlo, (rows, cols)
    # a lesion near the chest wall is posterior on its own side only: mirrored, it would be anterior
    wrong_side = "right" if chest_wall == "left" else "left"
    assert lesion_position(box((40, 50), (10, 20), chest_wall), "CC", wrong_side, mask)[1] == "anterior"


def test_lesion_position_follows_a_tilted_mlo_nipple_axis():
    mask = breast(tilt_deg=30.0, centre_row=60)  # the breast droops: the nipple lies 60 px below the axis start
    on_axis = (60 + 60 * math.sin(math.radians(30)), 60 * math.cos(math.radians(30)))  # halfway to the nipple
    lesion = [int(on_axis[0]) - 4, int(on_axis[1]) - 4, int(on_axis[0]) + 4, int(on_axis[1]) + 4]
    assert lesion_position(lesion, "MLO", "left", mask, tilt_deg=30.0) == ("central", "middle")
    above = [lesion[0] - 40, lesion[1], lesion[2] - 40, lesion[3]]
    below = [lesion[0] + 40, lesion[1], lesion[2] + 40, lesion[3]]
    assert lesion_position(above, "MLO", "left", mask, tilt_deg=30.0)[0] == "upper"
    assert lesion_position(below, "MLO", "left", mask, tilt_deg=30.0)[0] == "lower"
    assert lesion_position(lesion, "ML", "left", mask) is None  # only CC and MLO are read
    assert lesion_position(lesion, "CC", "left", np.zeros_like(mask)) is None


def test_combine_regions():
    assert combine_regions("outer", "upper") == "UOQ"
    assert combine_regions("inner", "lower") == "LIQ"
    assert combine_regions("central", "upper") == "upper"
    assert combine_regions("inner", "central") == "inner"
    assert combine_regions("retroareolar", "central") == "retroareolar"
    assert combine_regions(None, "lower") == "lower"
    assert combine_regions(None, None) is None


# --- phantom labels CSVs -------------------------------------------------------------------------

Place = tuple[tuple[int, int], tuple[int, int]]  # (rows, cols) of a box, the chest wall on the left


def phantom_csv(folder: Path, side: str, cc: Place, mlo: Place, height: float | None = None) -> Path:
    """A four-view exam as the phantom writes its labels: one mass in breast ``side`` at ``cc`` and ``mlo``,
    ``height`` its centre above the detector in the CC (of 50 mm)."""
    import imageio.v3 as iio

    rows = []
    for view in ("CC", "MLO"):
        for laterality in ("R", "L"):
            wall = "left" if laterality == "L" else "right"
            mask_name = f"{laterality}{view}_breast.png"
            iio.imwrite(folder / mask_name, breast(wall).astype(np.uint8) * 255)
            lesions, drawn = [], []
            if laterality == side:
                at = box(*(cc if view == "CC" else mlo), wall)
                lesions = [{"kind": "mass", "shape": "spiculated", "label": 1, "box": at, "size_mm": 12.3}]
                drawn = [{"kind": "mass", "shape": "spiculated", "size_mm": 12.3}]
                if height is not None:
                    drawn[0]["center_zrc_mm"] = [height, 0.0, 0.0]
            rows.append({"path": f"{laterality}{view}.dcm", "patient_id": "PH0-000000", "item": 0, "kind": "ffdm",
                         "view": view, "laterality": laterality, "density": "C", "lesions": json.dumps(lesions),
                         "breast_mask": mask_name, "chest_wall": wall, "spacing_mm": "[0.5, 0.5]",
                         "params": json.dumps({"thickness_mm": 50.0, "lesions": drawn,
                                               "breast": {"tilt_deg": {"CC": 0.0, "MLO": 0.0}}})})
    path = folder / "labels.csv"
    write_csv(rows, path)
    return path


@pytest.mark.parametrize("side", ["L", "R"])
def test_phantom_quadrant_from_both_views(tmp_path, side):
    templates = load_templates("phantom")
    # outer on the CC (top), lower on the MLO (bottom): the lower outer quadrant, said on both views
    labels = phantom_csv(tmp_path, side, cc=((40, 50), (50, 60)), mlo=((150, 160), (50, 60)))
    reports = {r["path"]: r["report"] for r in reports_for_csv(labels, seed=3)}
    for view in ("CC", "MLO"):
        report = reports[f"{side}{view}.dcm"]
        assert said(report, templates, "region", "LOQ") and said(report, templates, "depth", "middle"), report
        assert said(report, templates, "side", side) and said(report, templates, "shape", "spiculated")
        assert "12 mm" in report
    other = "R" if side == "L" else "L"
    for view in ("CC", "MLO"):
        assert "no mass" in reports[f"{other}{view}.dcm"].lower() or "no suspicious mass" in \
            reports[f"{other}{view}.dcm"].lower(), reports[f"{other}{view}.dcm"]
    # the CC's truth puts the mass high in the compressed breast (40 of 50 mm): upper, whatever the MLO shows
    (tmp_path / "high").mkdir()
    labels = phantom_csv(tmp_path / "high", side, cc=((40, 50), (50, 60)), mlo=((150, 160), (50, 60)), height=40.0)
    for report in reports_for_csv(labels, seed=3):
        if report["path"].startswith(side):
            assert said(report["report"], templates, "region", "UOQ"), report
    # without its outline a lesion gets no position, never a guessed one
    row = next(r for r in csv.DictReader(open(labels)) if r["laterality"] == side)
    sentences = report_sentences({**row, "breast_mask": ""}, templates, np.random.default_rng(0), base=tmp_path)
    assert not any(said(" ".join(sentences), templates, "depth", d) for d in ("anterior", "middle", "posterior"))


def test_sample_reports_say_every_attribute_and_negatives():
    templates = load_templates("phantom")
    rows = {row["path"]: row for row in csv.DictReader(open(SAMPLES / "labels.csv"))}
    for seed in range(3):
        for report in reports_for_csv(SAMPLES / "labels.csv", seed=seed):
            row, text = rows[report["path"]], report["report"]
            assert report["sentences"] and text == " ".join(report["sentences"])
            for field, column in (("side", "laterality"), ("view", "view"), ("modality", "kind"),
                                  ("density", "density"), ("density_class", "density")):
                assert said(text, templates, field, row[column]), (field, text)
            lesions = json.loads(row["lesions"])
            for lesion in lesions:
                assert said(text, templates, "type", lesion["kind"]) and said(text, templates, "shape", lesion["shape"])
                assert f"{lesion['size_mm']:.0f} mm" in text, text
            if lesions:  # the sample masks are there: every lesion is placed
                assert any(said(text, templates, "depth", d) for d in ("anterior", "middle", "posterior")), text
                assert sum(said(text, templates, "region", r) for r in templates.fields["region"].values) >= 1
            kinds = {lesion["kind"] for lesion in lesions}
            negative = [s.lower() for s in report["sentences"] if s.lower().startswith(("no ", "there is no",
                                                                                        "there are no", "negative"))]
            assert bool(negative) == (kinds != {"mass", "calc"}), text
            if "mass" not in kinds:
                assert any("mass" in s for s in negative), text
            if "calc" not in kinds:
                assert any("calcification" in s for s in negative), text
            if "mass" in kinds:
                assert not any("no mass" in s or "no suspicious mass" in s for s in negative), text


def test_same_seed_same_text_other_seeds_other_words():
    first = reports_for_csv(SAMPLES / "labels.csv", seed=0)
    assert reports_for_csv(SAMPLES / "labels.csv", seed=0) == first
    others = [reports_for_csv(SAMPLES / "labels.csv", seed=s) for s in range(1, 4)]
    for i, report in enumerate(first):
        assert any(o[i]["report"] != report["report"] for o in others), report["path"]
        assert all(o[i]["path"] == report["path"] and len(o[i]["sentences"]) == len(report["sentences"])
                   for o in others)


# --- CBIS-DDSM -----------------------------------------------------------------------------------

CBIS_MASS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "path"]


def cbis_csv(folder: Path, rows: list[list[str]], header: list[str] = CBIS_MASS) -> Path:
    path = folder / "mass_case_description.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_cbis_rows_map_to_sentences(tmp_path):
    templates = load_templates("cbis-ddsm")
    labels = cbis_csv(tmp_path, [
        ["P_00001", "3", "LEFT", "CC", "1", "mass", "LOBULATED-IRREGULAR", "SPICULATED", "4", "MALIGNANT", "4",
         "Mass-Training_P_00001_LEFT_CC/1.dcm", "P_00001_LEFT_CC.dcm"],
        ["P_00001", "3", "LEFT", "CC", "2", "mass", "OVAL", "N/A", "3", "BENIGN_WITHOUT_CALLBACK", "2",
         "Mass-Training_P_00001_LEFT_CC/1.dcm", "P_00001_LEFT_CC.dcm"],
        ["P_00002", "1", "RIGHT", "MLO", "1", "mass", "ROUND", "CIRCUMSCRIBED-OBSCURED", "2", "BENIGN", "5",
         "Mass-Training_P_00002_RIGHT_MLO/1.dcm", "P_00002_RIGHT_MLO.dcm"],
    ])
    for seed in range(4):
        first, second = reports_for_csv(labels, seed=seed)  # auto-detected; two abnormalities, one image
        assert first["path"] == "P_00001_LEFT_CC.dcm" and second["path"] == "P_00002_RIGHT_MLO.dcm"
        text = first["report"]
        for field, raw in (("side", "LEFT"), ("view", "CC"), ("density", "3"), ("density_class", "3"),
                           ("shape", "LOBULATED"), ("shape", "IRREGULAR"), ("margins", "SPICULATED"),
                           ("assessment", "4"), ("pathology", "MALIGNANT"), ("shape", "OVAL"), ("assessment", "3"),
                           ("pathology", "BENIGN_WITHOUT_CALLBACK")):
            assert said(text, templates, field, raw), (field, raw, text)
        assert "an oval" in text.lower() and "a oval" not in text.lower()
        assert sum(bool(re.search(r"\bmass\b", s.lower())) for s in first["sentences"]) == 2  # one per mass
        assert not any(s.lower().startswith(("no ", "there is no")) for s in first["sentences"])  # no negatives
        for field, raw in (("side", "RIGHT"), ("view", "MLO"), ("density", "1"), ("shape", "ROUND"),
                           ("margins", "CIRCUMSCRIBED"), ("margins", "OBSCURED"), ("pathology", "BENIGN")):
            assert said(second["report"], templates, field, raw), (field, raw, second["report"])


def test_cbis_calcification_row(tmp_path):
    templates = load_templates("cbis-ddsm")
    header = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
              "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "path"]
    row = ["P_00005", "2", "RIGHT", "MLO", "1", "calcification", "PUNCTATE-PLEOMORPHIC", "CLUSTERED", "4",
           "MALIGNANT", "calc.dcm"]
    rng = np.random.default_rng(image_seed(1, "calc.dcm"))  # the stream reports_for_csv gives this image
    sentences = report_sentences(dict(zip(header, row)), "cbis-ddsm", rng)
    text = " ".join(sentences)
    for field, raw in (("calc_type", "PUNCTATE"), ("calc_type", "PLEOMORPHIC"), ("distribution", "CLUSTERED"),
                       ("density", "2"), ("assessment", "4"), ("pathology", "MALIGNANT"), ("view", "MLO")):
        assert said(text, templates, field, raw), (field, raw, text)
    assert [r["report"] for r in reports_for_csv(cbis_csv(tmp_path, [row], header), seed=1)] == [text]


# --- errors --------------------------------------------------------------------------------------

def test_unknown_value_or_columns_is_one_line(tmp_path):
    labels = cbis_csv(tmp_path, [["P_1", "3", "LEFT", "CC", "1", "mass", "LOBULATED-HEXAGONAL", "SPICULATED", "4",
                                  "MALIGNANT", "4", "x.dcm", "x.dcm"]])
    with pytest.raises(MammoInputError) as info:
        reports_for_csv(labels)
    message = str(info.value)
    assert "\n" not in message and "row 2" in message and "HEXAGONAL" in message and "mass shape" in message
    assert "cbis-ddsm.json" in message
    other = tmp_path / "other.csv"
    other.write_text("path,finding\na.dcm,mass\n")
    with pytest.raises(MammoInputError, match="no report template fits") as info:
        reports_for_csv(other)
    assert "\n" not in str(info.value)
    with pytest.raises(MammoInputError, match="needs column") as info:
        reports_for_csv(labels, templates="phantom")
    assert "\n" not in str(info.value)
    with pytest.raises(MammoInputError, match="not one of"):
        load_templates("vindr")


def test_phantom_value_unknown_is_one_line(tmp_path):
    labels = phantom_csv(tmp_path, "L", cc=((40, 50), (50, 60)), mlo=((150, 160), (50, 60)))
    text = labels.read_text().replace(",C,", ",E,", 1)
    labels.write_text(text)
    with pytest.raises(MammoInputError) as info:
        reports_for_csv(labels)
    assert "\n" not in str(info.value) and "density 'E'" in str(info.value) and "phantom.json" in str(info.value)


GOOD = {"format": 1, "reader": "rows", "detect": ["finding"],
        "fields": {"finding": {"scope": "finding", "from": "finding", "values": {"mass": ["mass", "lump"]}}},
        "sentences": [{"scope": "finding", "say": ["A {finding}."]}]}


@pytest.mark.parametrize("change, key", [
    (lambda t: t.update(reader="words"), "reader"),
    (lambda t: t.update(colour="red"), "colour"),
    (lambda t: t["fields"]["finding"].pop("from"), "fields.finding.from"),
    (lambda t: t["fields"]["finding"].update(number=["{:.0f} mm"]), "fields.finding"),
    (lambda t: t["fields"]["finding"]["values"].update(calc="calcification"), "fields.finding.values.calc"),
    (lambda t: t["sentences"][0].update(say=["A {finding} in the {quadrant}."]), "sentences[0].say[0]"),
    (lambda t: t["sentences"][0].update(say=["A {finding:>5}."]), "sentences[0].say[0]"),
    (lambda t: t["sentences"][0].update(when={"finding": "calc"}), "sentences[0].when.finding"),
    (lambda t: t["sentences"].append({"say": ["A {finding}."]}), "sentences[1].say[0]"),  # image scope: no finding
])
def test_malformed_template_is_one_line(tmp_path, change, key):
    template = json.loads(json.dumps(GOOD))
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    assert load_templates(path).name == "mine"
    change(template)
    path.write_text(json.dumps(template))
    with pytest.raises(MammoInputError) as info:
        load_templates(path)
    assert "\n" not in str(info.value) and "mine.json" in str(info.value) and repr(key) in str(info.value)
    path.write_text('{"format": 1,')
    with pytest.raises(MammoInputError, match=r"mine.json: not JSON \(line 1"):
        load_templates(path)


def test_a_new_collection_is_a_template_file(tmp_path):
    """The README's recipe: a JSON file with the collection's columns and phrasings, no code."""
    template = json.loads(json.dumps(GOOD))
    template["sentences"].append({"scope": "finding", "when": {"finding": "mass"}, "say": ["No calcification."]})
    (tmp_path / "mine.json").write_text(json.dumps(template))
    (tmp_path / "labels.csv").write_text("path,finding\na.dcm,mass\na.dcm,\nb.dcm,MASS\n")
    reports = reports_for_csv(tmp_path / "labels.csv", templates=tmp_path / "mine.json", seed=2)
    assert [r["path"] for r in reports] == ["a.dcm", "b.dcm"]
    assert reports[0]["sentences"][0] in ("A mass.", "A lump.") and reports[0]["sentences"][1] == "No calcification."
    assert set(available_templates()) >= {"phantom", "cbis-ddsm"}
    for name in available_templates():
        assert load_templates(name).fields
