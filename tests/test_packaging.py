"""The plugin is found by napari both from this (editable) checkout and from a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_validates_from_editable_install():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mammodino")
    assert manifest.name == "napari-mammodino"
    assert {r.command for r in manifest.contributions.readers} == {"napari-mammodino.get_reader"}
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "napari-mammodino"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with the venv's setuptools, no download needed.
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("napari_mammodino-*.whl")
    return path


def test_wheel_carries_root_manifest_inside_the_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "napari_mammodino/napari.yaml" in names
        assert zf.read("napari_mammodino/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        assert "training/dicom/io.py" in names and "training/cli.py" in names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
    assert "napari-mammodino = napari_mammodino:napari.yaml" in text
    assert "mammodino = training.cli:main" in text


def test_manifest_from_wheel_validates_and_imports(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    code = (
        "import napari_mammodino, pathlib, sys\n"
        f"assert napari_mammodino.__file__.startswith({str(tmp_path)!r}), napari_mammodino.__file__\n"
        "from npe2 import PluginManifest\n"
        "pm = PluginManifest.from_file(pathlib.Path(napari_mammodino.__file__).parent / 'napari.yaml')\n"
        "pm.validate_imports()\n"
        "print(pm.name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "napari-mammodino"
