"""The one inference path: images decoded in worker threads while the model computes, in order, with
their errors; a loaded model computes in the precision asked for."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from caption.data.images import ImageError, image_transform, prefetch, preprocess
from caption.errors import CaptionError
from caption.inference import load
from caption.runtime import resolve_runtime

# ----------------------------------------------------------------------------- overlapped loading


def test_prefetch_keeps_order_returns_image_errors_and_overlaps():
    def slow(i: int) -> int:
        if i == 2:
            raise ImageError(f"{i}.jpg", "broken")
        time.sleep(0.02)
        return i * 10

    t0 = time.perf_counter()
    out = list(prefetch(range(8), slow, threads=4))
    assert time.perf_counter() - t0 < 6 * 0.02  # several at once: one after the other takes 7 * 0.02 s
    assert [i for i, _ in out] == list(range(8)) and isinstance(out[2][1], ImageError)
    assert [r for i, r in out if i != 2] == [i * 10 for i in range(8) if i != 2]
    assert list(prefetch([1, 3], lambda i: i + 1, threads=0)) == [(1, 2), (3, 4)]
    started = []
    stream = prefetch(range(1000), lambda i: started.append(i) or i, threads=1, ahead=4)
    next(stream)
    stream.close()  # stopping early cancels what has not started
    assert len(started) < 20
    with pytest.raises(ZeroDivisionError):
        list(prefetch([0], lambda i: 1 // i, threads=1))


def test_caption_model_runs_in_the_precision_asked_for(tiny_checkpoint, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(image)
    fp32 = load(tiny_checkpoint, precision="fp32")
    bf16 = load(tiny_checkpoint, precision="bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    assert load(tiny_checkpoint).precision.requested == "auto"  # the checkpoint's own precision
    a, b = fp32.configured(beam=2).caption(image), bf16.configured(beam=2).caption(image)
    assert a.log_prob == pytest.approx(b.log_prob, abs=0.1) or a.tokens != b.tokens
    with Image.open(image) as opened:  # a file and the PIL image of it are prepared alike
        assert torch.equal(preprocess(image, fp32.transform), preprocess(opened, fp32.transform))
    batch = [o.result for o in fp32.configured(beam=2).captions([image, tmp_path / "missing.png", image])]
    assert isinstance(batch[1], ImageError) and batch[0].tokens == batch[2].tokens == a.tokens
    with pytest.raises(CaptionError, match="fp16"):
        load(tiny_checkpoint, precision="fp16")


def test_the_library_api_imports_nothing_from_training():
    """caption.inference may sit above training in the layers, but captioning needs none of it."""
    import ast

    import caption.inference

    tree = ast.parse(open(caption.inference.__file__, encoding="utf-8").read())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "caption.checkpoint" in modules and not [m for m in modules if m.startswith("caption.training")]


def test_encode_images_keeps_order_and_errors_in_place_across_batches(tmp_path):
    from caption.pipeline import encode_images

    transform = image_transform(8, (0.5,) * 3, (0.25,) * 3)
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        if i == 2:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (12, 10), (40 * i, 10, 200)).save(path)
        paths.append(path)
    encoder = torch.nn.Sequential(torch.nn.Flatten(2), torch.nn.Identity())  # (B, 3, 8, 8) -> (B, 3, 64)
    runtime = resolve_runtime("cpu", "fp32")
    batches = list(encode_images(encoder, paths, lambda p: preprocess(p, transform, pixels=True), transform, runtime,
                                 batch_size=2))
    assert [b.items for b in batches] == [paths[0:2], paths[2:4], paths[4:5]]
    assert isinstance(batches[1].results[0], ImageError) and batches[1].rows() == [1]
    for batch in batches:
        for row, i in enumerate(batch.rows()):
            expected = transform(Image.open(batch.items[i])).flatten(1)  # (3, 64)
            torch.testing.assert_close(batch.features[row], expected)
