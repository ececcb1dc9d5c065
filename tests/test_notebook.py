"""notebooks/attention.ipynb runs top to bottom on CPU against a tiny checkpoint (no network)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow  # a Jupyter kernel process

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "attention.ipynb"
SCORERS = ("additive", "dot", "general", "concat")


def _outputs(nb) -> str:
    """All text the executed notebook printed, plus a marker per displayed image."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "image/png" in out.get("data", {}):
                parts.append("<png>\n")
    return "".join(parts)


def _execute(nb, cwd: Path):
    """Run every cell in a fresh python3 kernel; skip when no kernel can start here."""
    nbclient = pytest.importorskip("nbclient")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.km = client.create_kernel_manager()
        client.start_new_kernel()
        client.start_new_kernel_client()
    except Exception as err:  # no kernelspec, ipykernel missing, no sockets...
        if client.km is not None:
            with contextlib.suppress(Exception):
                client.km.shutdown_kernel(now=True)
        pytest.skip(f"no Jupyter python3 kernel could start: {type(err).__name__}: {err}")
    return client.execute()  # shuts the kernel down; a failing cell raises CellExecutionError


@pytest.mark.parametrize("with_scorers", [True, False], ids=["scorer-runs", "no-scorer-runs"])
def test_attention_notebook_runs(with_scorers, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # the notebook takes the first 3
        Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    runs = {name: make_tiny_checkpoint(tmp_path / name / "best.pt", name) for name in SCORERS} if with_scorers else {}

    monkeypatch.setenv("CAPTION_CHECKPOINT", str(tiny_checkpoint))
    monkeypatch.setenv("CAPTION_IMAGES", str(images))
    if runs:
        monkeypatch.setenv("CAPTION_SCORER_RUNS", ",".join(f"{name}={path}" for name, path in runs.items()))
    else:
        monkeypatch.delenv("CAPTION_SCORER_RUNS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: thread wake-ups would dominate
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "stored outputs in the notebook"
    executed = _execute(nb, tmp_path)
    text = _outputs(executed)

    for name in ("0.png", "1.png", "2.png"):
        assert f"{name}: " in text
    assert "3.png" not in text
    assert text.count("greedy") == 3 and text.count("beam=3") == 3
    if with_scorers:
        assert "skipping" not in text
        for name in SCORERS:
            assert f"{name:>9} ({name}):" in text
        assert text.count("<png>") == 3 + len(SCORERS)  # one overlay per image, one per scorer
    else:
        assert "CAPTION_SCORER_RUNS is not set" in text
        assert text.count("<png>") == 3
