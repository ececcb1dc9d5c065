"""What a `pip install .` user gets: the configs the commands need by default ship inside the package."""

from __future__ import annotations

import pytest

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_packaged_demo_config_is_the_documented_one():
    assert (ROOT / "caption" / "configs" / "shapes.yaml").read_text() == (ROOT / "configs" / "shapes.yaml").read_text()


@pytest.mark.slow
def test_wheel_ships_the_demo_config_and_finds_it_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT / "caption", source / "caption", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("caption-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "caption/configs/shapes.yaml" in zf.namelist()
        zf.extractall(tmp_path / "site")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import caption.commands.demo as d, pathlib; "
            "cfg = d.demo_config(pathlib.Path('runs/shapes')); "
            "print(d.CONFIG.is_relative_to(pathlib.Path(d.__file__).parents[1]), cfg.data.metric, cfg.data.images)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=outside,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "shapes", "runs/shapes/data/images"]
    assert str(tmp_path / "site") in subprocess.run(
        [sys.executable, "-c", "import caption; print(caption.__file__)"], capture_output=True, text=True,
        cwd=outside, env=env, timeout=60).stdout
