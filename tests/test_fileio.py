"""Atomic writes: a failed write leaves the old file and no temp file behind; a full disk says so in one line."""

import errno
import json
import os

import pytest
from conftest import tiny_config

from caption.errors import CaptionError
from caption.fileio import (
    DiskFullError,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
)


def test_writes_create_folders_and_replace_the_old_file(tmp_path):
    path = tmp_path / "a" / "b.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert atomic_write_text(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _disk_full(f):
    f.write(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_stops_short(f):  # torch.save's writer, when the file object's write fails
    f.write(b"half")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def _torch_then_close_fails(f):  # ... and then flushing the file's buffer on close fails too
    try:
        _torch_stops_short(f)
    finally:
        _disk_full(f)


@pytest.mark.parametrize("write", [_disk_full, _torch_stops_short, _torch_then_close_fails])
def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path, write):
    path = tmp_path / "last.pt"
    path.write_bytes(b"old")
    with pytest.raises(DiskFullError) as err:
        atomic_write(path, write)
    message = str(err.value)
    assert isinstance(err.value, CaptionError) and err.value.exit_code != 0 and "\n" not in message
    assert str(path) in message and "no space left on device" in message
    assert "the previous last.pt is intact" in message
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    with pytest.raises(DiskFullError, match="nothing was written"):
        atomic_write(tmp_path / "new.pt", write)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_torch_save_onto_a_full_disk(tmp_path, monkeypatch):
    import torch

    from caption.checkpoint import atomic_torch_save

    def onto_dev_full(fd, mode):  # the temp file's writes fail with ENOSPC, as on a full disk
        os.close(fd)
        return open("/dev/full", mode)

    path = atomic_torch_save({"w": torch.ones(3)}, tmp_path / "last.pt")
    monkeypatch.setattr(os, "fdopen", onto_dev_full)
    with pytest.raises(DiskFullError, match="no space left on device; the previous last.pt is intact"):
        atomic_torch_save({"w": torch.zeros(1000, 1000)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3)) and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_train_on_a_full_disk_exits_with_one_line(shapes_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    import torch

    from caption.commands.main import main
    from caption.training.loop import fit

    run = tmp_path / "run"
    fit(tiny_config(shapes_dir, "train.epochs=1"), run, progress_bars=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    monkeypatch.setattr(torch, "save", lambda obj, f: _disk_full(f))
    assert main(["train", "--resume", str(run), "--device", "cpu", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("caption train: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write {run}" in lines[0] and "no space left on device" in lines[0] and "intact" in lines[0]
    for name in ("last.pt", "best.pt", "metrics.csv"):  # the run stays as it was: free space, then resume
        assert (run / name).read_bytes() == before[name], name
    assert not list(run.glob(".*.tmp"))
