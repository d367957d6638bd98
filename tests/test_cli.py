"""`mammodino info`: one JSON object on stdout for a good file; for bad input exit status 2, nothing
on stdout and exactly one line on stderr that says what is wrong (no traceback, no hang)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import MPEG2MPML, RLELossless

from dicom_factory import (damage, labelled_volume, ramp, truncate, write_enhanced_dbt, write_fake_encapsulated,
                           write_ffdm)
from training.cli import main

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {"kind", "shape", "spacing_mm", "view", "laterality", "photometric", "windows", "transfer_syntax"}
IMAGE = ramp((64, 48))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m training ...` as a user (or a GUI job) runs it; a hang fails the test."""
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _text_file(tmp: Path) -> Path:
    (tmp / "report.dcm").write_text("Patient: Jane Doe\nBI-RADS 2\n")
    return tmp / "report.dcm"


def _mixed_folder(tmp: Path) -> Path:
    write_ffdm(tmp / "exam" / "a", IMAGE, view="CC")
    write_ffdm(tmp / "exam" / "b", IMAGE, view="MLO")
    return tmp / "exam"


def _empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images here")
    return tmp / "empty"


# name: (makes the bad input in a tmp folder, what the one line must say)
BAD_INPUTS = {
    "not_dicom": (_text_file, "not a DICOM file"),
    "header_cut_midway": (lambda t: truncate(write_ffdm(t / "x.dcm", IMAGE), 400), "truncated"),
    "pixel_data_cut_short": (lambda t: truncate(write_ffdm(t / "x.dcm", IMAGE), -100), "truncated"),
    "compressed_pixel_data_cut_short": (
        lambda t: truncate(write_enhanced_dbt(t / "x.dcm", labelled_volume(6), transfer_syntax=RLELossless), -200),
        "truncated"),
    "no_pixel_data": (lambda t: write_ffdm(t / "x.dcm", IMAGE, PixelData=None), "no pixel data"),
    "fewer_pixels_than_rows_say": (lambda t: write_ffdm(t / "x.dcm", IMAGE, Rows=128), "shorter than the header"),
    "absurd_size": (lambda t: write_ffdm(t / "x.dcm", IMAGE, Rows=65535, Columns=65535, NumberOfFrames=100000),
                    "65535 x 65535"),
    "malformed_number_of_frames": (
        lambda t: damage(write_ffdm(t / "x.dcm", IMAGE, NumberOfFrames="+0001"), "+0001", "+00x1"),
        "NumberOfFrames"),
    "unsupported_syntax": (lambda t: write_fake_encapsulated(t / "x.dcm", MPEG2MPML), "MPEG2"),
    "empty_folder": (_empty_folder, "no DICOM files"),
    "mixed_folder": (_mixed_folder, "mixes 2 images"),
    "missing_path": (lambda t: t / "nowhere.dcm", "no such file"),
}
# The real process too, where a stray warning or traceback would reach the terminal.
IN_SUBPROCESS = ["not_dicom", "pixel_data_cut_short", "absurd_size", "malformed_number_of_frames",
                 "unsupported_syntax", "mixed_folder"]


def assert_one_line_error(code: int, out: str, err: str, says: str) -> None:
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("mammodino info: error: ") and says in err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr(tmp_path, capsys, case):
    make, says = BAD_INPUTS[case]
    code = main(["info", str(make(tmp_path)), "--json"])
    assert_one_line_error(code, *capsys.readouterr(), says)


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_bad_input_in_a_real_process(tmp_path, case):
    make, says = BAD_INPUTS[case]
    done = run_cli("info", make(tmp_path), "--json")
    assert_one_line_error(done.returncode, done.stdout, done.stderr, says)
    if case == "unsupported_syntax":
        assert MPEG2MPML in done.stderr  # names the syntax by UID too


def test_usage_mistake_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info"])
    out, err = capsys.readouterr()
    assert (exit_.value.code, out, err.count("\n")) == (2, "", 1)
    assert "path" in err


def test_info_json_on_the_real_jpeg2000_mammogram(mg1_path):
    done = run_cli("info", mg1_path, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # exactly one JSON object, one line
    report = json.loads(done.stdout)
    assert CONTRACT_KEYS <= report.keys()
    assert {k: report[k] for k in CONTRACT_KEYS - {"windows"}} == {
        "kind": "ffdm", "shape": [4664, 3064], "spacing_mm": None, "view": "MLO", "laterality": "L",
        "photometric": "MONOCHROME2", "transfer_syntax": "1.2.840.10008.1.2.4.91"}
    assert [(w["center"], w["width"]) for w in report["windows"]] == [(2047, 4095)]


def test_info_json_on_an_enhanced_dbt(tmp_path):
    windows = [(100 * i + 50, 100) for i in range(8)]
    path = write_enhanced_dbt(tmp_path / "dbt", labelled_volume(8), spacing=(0.09, 0.07), slice_spacing=1.25,
                              laterality="L", view="CC", per_frame_windows=windows, transfer_syntax=RLELossless)
    done = run_cli("info", path, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["kind"], report["shape"], report["view"], report["laterality"]) == ("dbt", [8, 64, 48], "CC", "L")
    assert report["spacing_mm"] == pytest.approx([1.25, 0.09, 0.07])  # slices, rows, cols
    assert report["transfer_syntax"] == RLELossless and report["photometric"] == "MONOCHROME2"
    assert [(w["center"], w["width"]) for w in report["windows"]] == [windows[0]]
    assert [[(w["center"], w["width"]) for w in f] for f in report["frame_windows"]] == [[w] for w in windows]


def test_info_reads_headers_only_and_talks_to_people_without_json(tmp_path, capsys, decoded):
    path = write_ffdm(tmp_path / "lcc", np.full((64, 48), 7, np.uint16), view="CC", laterality="L",
                      window=(2000, 4000))
    assert main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    assert decoded == []  # info never decodes a pixel
    lines = {key: value.strip() for key, _, value in (line.partition(" ") for line in out.splitlines())}
    assert (lines["view"], lines["laterality"], lines["windows"]) == ("CC", "L", "2000/4000 LINEAR")
    assert err == ""
