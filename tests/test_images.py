"""Image loading: every Pillow mode to RGB, EXIF orientation, huge and broken files, the model transform."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, JpegImagePlugin

from caption.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    find_images,
    image_transform,
    load_image,
    preprocess,
    to_rgb,
)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_grey_and_one_bit(tmp_path):
    grey = Image.new("L", (4, 3), 77)
    grey.save(tmp_path / "grey.png")
    bits = Image.new("1", (4, 3), 0)
    bits.putpixel((1, 1), 1)
    bits.save(tmp_path / "bits.png")
    assert (_pixels(load_image(tmp_path / "grey.png")) == 77).all()
    out = _pixels(load_image(tmp_path / "bits.png"))
    assert out.shape == (3, 4, 3)
    assert (out[1, 1] == 255).all() and (out[0, 0] == 0).all()


def test_alpha_is_composited_on_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))  # fully transparent black -> white
    la.putpixel((1, 0), (100, 255))  # opaque grey stays grey
    la.save(tmp_path / "la.png")
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red -> pink
    rgba.save(tmp_path / "rgba.png")

    out = _pixels(load_image(tmp_path / "la.png"))
    assert (out[0, 0] == 255).all() and (out[0, 1] == 100).all()
    out = _pixels(load_image(tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1][0] == 255 and 120 <= out[0, 1][1] <= 135 and out[0, 1][1] == out[0, 1][2]


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=0)
    plain, clear = _pixels(load_image(tmp_path / "p.png")), _pixels(load_image(tmp_path / "pt.png"))
    assert plain[0, 0].tolist() == [0, 0, 0] and plain[1, 1].tolist() == [0, 200, 0]
    assert clear[0, 0].tolist() == [255, 255, 255] and clear[1, 1].tolist() == [0, 200, 0]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    r, g, b = _pixels(load_image(tmp_path / "cmyk.jpg"))[8, 8]
    assert r > 230 and g < 25 and b < 25


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    out = _pixels(load_image(tmp_path / "deep.png"))[0, :, 0]
    assert out.tolist() == [0, 4, 128, 255]  # Pillow's own convert("L") would give [0, 255, 255, 255]


def test_float_and_32_bit_modes():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert _pixels(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]
    ints = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert ints.mode == "I"
    assert _pixels(to_rgb(ints))[0, :, 0].tolist() == [0, 128, 255]  # out of range: stretched


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)

    image = load_image(tmp_path / "rot.jpg")
    assert image.size == (10, 20)
    px = _pixels(image)
    assert px[3, 5].tolist()[0] > 200 and px[3, 5].tolist()[2] < 50  # top half red
    assert px[16, 5].tolist()[2] > 200 and px[16, 5].tolist()[0] < 50  # bottom half blue


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    x = preprocess(tmp_path / "dot.png", image_transform(8, (0, 0, 0), (1, 1, 1)))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[:, 4, 4], torch.tensor([10, 20, 30]) / 255.0)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    big = Image.new("RGB", (8000, 8000), (10, 200, 30))
    big.paste((250, 250, 250), (0, 0, 4000, 8000))  # left half white
    big.save(path, quality=50)
    return path


def test_huge_jpeg_is_drafted_before_decoding(huge_jpeg, monkeypatch):
    decoded = []
    original = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    image = load_image(huge_jpeg, max_side=500)
    assert max(image.size) == 500
    assert decoded and max(decoded[0]) <= 1000  # decoded at 1/8 scale, never 8000 x 8000 (192 MB)
    px = _pixels(image)
    assert (px[250, 100] > 240).all() and abs(px[250, 400][1] - 200) < 10


def test_decompression_bomb_is_an_image_error(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 900 MP RGB, no pixel data
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="bomb.png: too many pixels"):
        load_image(tmp_path / "bomb.png")


def test_broken_inputs_raise_image_error_naming_the_path(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()

    assert load_image(tmp_path / "ok.jpg").size == (64, 64)
    for name, reason in [("cut.jpg", "truncated"), ("notes.jpg", "not an image"), ("empty.png", "not an image"),
                         ("missing.png", "no such file"), ("folder.jpg", "folder")]:
        with pytest.raises(ImageError, match=reason) as info:
            load_image(tmp_path / name)
        assert info.value.path == tmp_path / name
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_transform_resizes_whole_image_and_normalises(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red: a centre crop would cut it
    transform = image_transform(12, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = transform(image)
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32
    assert torch.allclose(x[:, 6, 0], torch.tensor([2.0, -2.0, -2.0]), atol=1e-5)  # (1 - .5) / .25
    assert torch.allclose(x[:, 6, 11], torch.tensor([-2.0, -2.0, 2.0]), atol=1e-5)
    image.save(tmp_path / "wide.png")  # smaller than transform.max_side: loaded as is
    assert torch.equal(preprocess(tmp_path / "wide.png", transform), x)
    assert transform(Image.new("L", (5, 5), 255)).shape == (3, 12, 12)  # any mode accepted
    pixels = preprocess(tmp_path / "wide.png", transform, pixels=True)  # what data.keep_images keeps
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 12, 12)
    assert torch.equal(transform.normalize(pixels), x)
    # the same numbers as torchvision's ToTensor + Normalize
    expected = TF.normalize(TF.to_tensor(image.resize((12, 12), Image.Resampling.BILINEAR)), (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(x, expected)


def test_preprocess_matches_manual_pipeline(huge_jpeg):
    transform = image_transform(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = transform(load_image(huge_jpeg, max_side=transform.max_side))
    assert torch.equal(preprocess(huge_jpeg, transform), expected)


def test_find_images(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ["b.PNG", "a.jpg", ".hidden.jpg", "notes.txt"]:
        (folder / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "single.jpeg"
    single.write_bytes(b"x")

    found, errors = find_images([folder, single, tmp_path / "nope.jpg", tmp_path / "empty", folder / "a.jpg"])
    assert found == [folder / "a.jpg", folder / "b.PNG", single]
    assert len(errors) == 2
    assert "nope.jpg" in errors[0] and "no such file" in errors[0]
    assert "empty" in errors[1] and "no images" in errors[1]
    assert ".jpg" in IMAGE_EXTENSIONS and ".png" in IMAGE_EXTENSIONS
