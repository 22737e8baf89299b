"""The package works when installed from a wheel, from any folder: the embedded default models
ship inside it (``graphprune.models``) and nothing generic lands at the top of site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside setup.py
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "out", "build", "*.egg-info", "__pycache__", ".pytest_cache", "*.onnx"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{r.stdout}\n{r.stderr}")
    (whl,) = out.glob("graphprune-*.whl")
    return whl


def test_wheel_holds_every_package_and_no_generic_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"graphprune"}, tops
    shipped = {os.path.dirname(n) for n in names if n.endswith("__init__.py")}
    source = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "graphprune").rglob("__init__.py")}
    assert source <= shipped, f"packages missing from the wheel: {sorted(source - shipped)}"
    assert "graphprune/models/digits.py" in names


def test_installed_wheel_runs_the_embedded_default_from_an_empty_folder(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                        str(site), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import graphprune, graphprune.specs as s; print(graphprune.__file__); "
            "m, shape = s.load_model('digits'); print(type(m).__name__, shape)")
    r = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    where, built = r.stdout.strip().splitlines()
    assert where.startswith(str(site)), f"imported {where}, not the installed wheel"
    assert built.endswith("(1, 1, 8, 8)")
    r = subprocess.run([sys.executable, "-m", "graphprune", "inspect", "--model", "digits",
                        "--json"], cwd=empty, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"groups"' in r.stdout
    assert os.listdir(empty) == [], "the command wrote into the working folder"
