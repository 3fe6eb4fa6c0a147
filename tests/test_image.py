"""darknetpy.image against Darknet: reference inputs, a loop-for-loop port of image.c,
stb_image's colour rules, and decode errors.

Run as a script (``python tests/test_image.py [REFERENCE_DIR]``) to print how far Pillow's
JPEG decode is from Darknet's (stb_image) on the reference sample images.
"""
from __future__ import annotations

import io
import json
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from darknetpy.errors import ImageError
from darknetpy.image import letterbox_dims, letterbox_image, load_image, prepare_input, resize_image

f32 = np.float32


# --------------------------------------------------------------------------------------
# Loop-for-loop ports of image.c (float32 scalar arithmetic in Darknet's order)
# --------------------------------------------------------------------------------------

def naive_resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """image.c resize_image, (C, H, W) float32 -> (C, h, w)."""
    chans, im_h, im_w = im.shape
    resized = np.zeros((chans, h, w), f32)
    part = np.zeros((chans, im_h, w), f32)
    w_scale = f32(im_w - 1) / f32(w - 1) if w > 1 else f32(0)  # w == 1: never used
    h_scale = f32(im_h - 1) / f32(h - 1) if h > 1 else f32(0)  # h == 1: Darknet UB, see image.py
    for k in range(chans):
        for r in range(im_h):
            for c in range(w):
                if c == w - 1 or im_w == 1:
                    val = im[k, r, im_w - 1]
                else:
                    sx = f32(c) * w_scale
                    ix = int(sx)
                    dx = sx - f32(ix)
                    val = (f32(1) - dx) * im[k, r, ix] + dx * im[k, r, ix + 1]
                part[k, r, c] = val
    for k in range(chans):
        for r in range(h):
            sy = f32(r) * h_scale
            iy = int(sy)
            dy = sy - f32(iy)
            for c in range(w):
                resized[k, r, c] = (f32(1) - dy) * part[k, iy, c]
            if r == h - 1 or im_h == 1:
                continue
            for c in range(w):
                resized[k, r, c] += dy * part[k, iy + 1, c]
    return resized


def naive_letterbox_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """image.c letterbox_image + fill_image + embed_image, (C, H, W) -> (C, h, w)."""
    chans, im_h, im_w = im.shape
    if f32(w) / f32(im_w) < f32(h) / f32(im_h):
        new_w, new_h = w, (im_h * w) // im_w
    else:
        new_h, new_w = h, (im_w * h) // im_h
    resized = naive_resize_image(im, new_w, new_h)
    boxed = np.full((chans, h, w), 0.5, f32)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    for k in range(chans):
        for y in range(new_h):
            for x in range(new_w):
                if 0 <= dx + x < w and 0 <= dy + y < h:  # set_pixel ignores out-of-range
                    boxed[k, dy + y, dx + x] = resized[k, y, x]
    return boxed


# (in_w, in_h) -> (w, h): odd sizes, 1-pixel dims, up and down, same size, and the
# last-row quirk (in_h 2 -> 42 and 512 -> 402: float32 sy of the last row < in_h-1).
RESIZE_CASES = [((7, 5), (4, 9)), ((5, 7), (9, 4)), ((1, 1), (3, 4)), ((1, 6), (5, 1)),
                ((6, 1), (1, 5)), ((8, 8), (1, 1)), ((13, 11), (13, 11)), ((3, 2), (17, 23)),
                ((31, 17), (6, 5)), ((4, 2), (3, 42)), ((2, 512), (3, 402)), ((9, 4), (0, 3))]
LETTERBOX_CASES = [((7, 5), (9, 4)), ((5, 7), (4, 9)), ((31, 9), (16, 16)), ((9, 31), (16, 16)),
                   ((1, 1), (5, 3)), ((10, 10), (7, 7)), ((40, 1), (8, 8)), ((16, 2), (8, 8)),
                   ((11, 13), (6, 11))]


@pytest.mark.parametrize("size_in,size_out", RESIZE_CASES)
def test_resize_matches_naive_port(size_in, size_out):
    (in_w, in_h), (w, h) = size_in, size_out
    chans = 1 if in_h > 100 else 3
    im = np.random.default_rng(in_w * 100 + in_h).random((chans, in_h, in_w), dtype=f32)
    ours = resize_image(torch.from_numpy(im), w, h)
    assert ours.shape == (chans, h, w) and ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(naive_resize_image(im, w, h)))  # bit-exact


@pytest.mark.parametrize("size_in,size_out", LETTERBOX_CASES)
def test_letterbox_matches_naive_port(size_in, size_out):
    (in_w, in_h), (w, h) = size_in, size_out
    im = np.random.default_rng(in_w * 100 + in_h).random((3, in_h, in_w), dtype=f32)
    ours = letterbox_image(torch.from_numpy(im), w, h)
    assert ours.shape == (3, h, w)
    assert torch.equal(ours, torch.from_numpy(naive_letterbox_image(im, w, h)))


def test_resize_batched_equals_single():
    ims = torch.rand(2, 3, 5, 7)
    out = resize_image(ims, 9, 4)
    assert out.shape == (2, 3, 4, 9)
    for i in range(2):
        assert torch.equal(out[i], resize_image(ims[i], 9, 4))
    boxed = letterbox_image(ims, 8, 8)
    assert torch.equal(boxed[1], letterbox_image(ims[1], 8, 8))


def test_resize_same_size_is_identity():
    im = torch.rand(3, 5, 7)
    assert torch.equal(resize_image(im, 7, 5), im)


def test_resize_last_row_quirk():
    # float32: 41 * (1/41) rounds below 1, so the last row is (1-dy)*row0 with dy ~ 1.
    out = resize_image(torch.ones(1, 2, 3), 3, 42)
    assert out[0, -1].max() < 1e-6
    assert torch.all(out[0, :-1] > 0.999)


def test_resize_is_align_corners_bilinear():
    im = torch.rand(3, 6, 10)
    ref = torch.nn.functional.interpolate(im[None], size=(11, 7), mode="bilinear",
                                          align_corners=True)[0]
    assert (resize_image(im, 7, 11) - ref).abs().max() < 1e-5


def test_letterbox_dims():
    assert letterbox_dims(768, 576, 416, 416) == (416, 312)
    assert letterbox_dims(773, 512, 608, 608) == (608, 402)
    assert letterbox_dims(424, 640, 256, 256) == (169, 256)
    assert letterbox_dims(100, 100, 320, 256) == (256, 256)
    with pytest.raises(ValueError):
        letterbox_dims(0, 10, 416, 416)


def test_letterbox_canvas():
    out = letterbox_image(torch.zeros(3, 2, 8), 8, 8)  # new 8x2 at dy = 3
    assert torch.all(out[:, 3:5] == 0) and torch.all(out[:, :3] == 0.5) and torch.all(out[:, 5:] == 0.5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        resize_image(torch.zeros(3, 4, 4, dtype=torch.uint8), 2, 2)
    with pytest.raises(ValueError):
        resize_image(torch.zeros(4, 4), 2, 2)
    with pytest.raises(ValueError):
        resize_image(torch.zeros(3, 4, 4), -1, 2)
    with pytest.raises(ValueError):
        letterbox_image(torch.zeros(3, 4, 4), 0, 2)


# --------------------------------------------------------------------------------------
# Reference cases: Darknet's own network input
# --------------------------------------------------------------------------------------

def _net_size(cfg_text: str) -> tuple[int, int]:
    net = re.split(r"^\s*\[(?!net\]|network\])", cfg_text, maxsplit=1, flags=re.M)[0]
    get = lambda key: int(re.search(rf"^\s*{key}\s*=\s*(\d+)", net, re.M).group(1))  # noqa: E731
    return get("width"), get("height")


def test_reference_input(reference_dir, reference_case):
    case = reference_dir / "cases" / reference_case
    if not (case / "case.json").is_file():
        pytest.fail(f"no reference cases under {reference_dir / 'cases'}")
    meta = json.loads((case / "case.json").read_text())
    net_w, net_h = _net_size((case / "model.cfg").read_text())
    image_u8 = np.load(reference_dir / "images" / (Path(meta["image"]).stem + ".npz"))["image_u8"]
    im = torch.from_numpy(image_u8.astype(np.float64) / 255.0).float()  # (float)byte/255.
    ours = (letterbox_image if meta["letterbox"] else resize_image)(im, net_w, net_h)
    ref = torch.from_numpy(np.load(case / "outputs.npz")["input"]).reshape(3, net_h, net_w)
    assert (ours - ref).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------
# Loading: stb_image's colour rules, Python inputs, errors
# --------------------------------------------------------------------------------------

def _levels(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) float 0..1 -> int levels 0..255, (H, W, 3)."""
    return np.rint(t.numpy() * 255).astype(int).transpose(1, 2, 0)


def _png(w: int, h: int, bit_depth: int, color_type: int, samples: np.ndarray) -> bytes:
    """A minimal PNG (for 16-bit colour types Pillow cannot write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = samples.astype(">u2" if bit_depth == 16 else "u1").reshape(h, -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in raw)
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_load_values_are_byte_over_255(tmp_path):
    rgb = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32).reshape(16, 16)
    assert all(torch.equal(out[c], torch.from_numpy(expected)) for c in range(3))


def test_load_grayscale(tmp_path):
    Image.new("L", (3, 2), 128).save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))
    assert out.shape == (3, 2, 3) and torch.all(out == f32(128 / 255))


def test_load_bilevel(tmp_path):
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "b.png")
    assert _levels(load_image(tmp_path / "b.png"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_load_rgba_and_la_drop_alpha(tmp_path):
    Image.new("RGBA", (2, 2), (10, 20, 30, 40)).save(tmp_path / "a.png")
    assert (_levels(load_image(tmp_path / "a.png")) == [10, 20, 30]).all()
    Image.new("LA", (2, 2), (77, 0)).save(tmp_path / "la.png")
    assert (_levels(load_image(tmp_path / "la.png")) == 77).all()


def test_load_palette(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 40, 50, 60])
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "p.png", transparency=0)
    assert _levels(load_image(tmp_path / "p.png"))[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_load_16bit_keeps_high_byte(tmp_path):
    # stbi__convert_16_to_8 is v >> 8; Pillow's own I;16 -> L conversion would clip to 255.
    gray = np.array([[0x1234, 0x00FF, 0xFFFF, 0x80FF]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    assert _levels(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0x12, 0, 0xFF, 0x80]
    rgb16 = np.array([0x12FF, 0x8000, 0xFF01], dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png(1, 1, 16, 2, rgb16))
    assert _levels(load_image(tmp_path / "rgb16.png"))[0, 0].tolist() == [0x12, 0x80, 0xFF]
    rgba16 = np.array([0x12FF, 0x8000, 0xFF01, 0x7777], dtype=np.uint16)
    (tmp_path / "rgba16.png").write_bytes(_png(1, 1, 16, 6, rgba16))
    assert _levels(load_image(tmp_path / "rgba16.png"))[0, 0].tolist() == [0x12, 0x80, 0xFF]
    la16 = np.array([0x12FF, 0x7777], dtype=np.uint16)
    (tmp_path / "la16.png").write_bytes(_png(1, 1, 16, 4, la16))
    assert _levels(load_image(tmp_path / "la16.png"))[0, 0].tolist() == [0x12] * 3


def _cmyk_jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), color).save(buf, "JPEG", quality=100)
    return buf.getvalue()


def test_load_cmyk_jpeg_adobe(tmp_path):
    # stb: R = blinn_8x8(255-C, 255-K) = (255-C)(255-K)/255 rounded; same as Pillow here.
    for cmyk in [(0, 255, 255, 0), (50, 100, 150, 60)]:
        path = tmp_path / "cmyk.jpg"
        path.write_bytes(_cmyk_jpeg(cmyk))
        got = _levels(load_image(path))
        expected = [round((255 - v) * (255 - cmyk[3]) / 255) for v in cmyk[:3]]
        assert np.abs(got - expected).max() <= 2
        with Image.open(path) as im:
            assert (got == np.asarray(im.convert("RGB"))).all()


def test_load_cmyk_jpeg_without_adobe_marker(tmp_path):
    # Stored (inverted) bytes of CMYK red are (255, 0, 0, 255). Without the APP14 marker
    # stb reads them as YCbCr (Y=255, Cb=Cr=0) and ignores K: RGB ~ (76, 255, 28).
    data = _cmyk_jpeg((0, 255, 255, 0))
    i = data.find(b"\xff\xee")
    assert data[i + 4:i + 9] == b"Adobe"
    length = struct.unpack(">H", data[i + 2:i + 4])[0]
    (tmp_path / "no_app14.jpg").write_bytes(data[:i] + data[i + 2 + length:])
    assert np.abs(_levels(load_image(tmp_path / "no_app14.jpg")) - [76, 255, 28]).max() <= 2
    # Adobe transform 1 with 4 channels: libjpeg assumes YCCK, stb YCbCr -> same colour.
    patched = bytearray(data)
    patched[i + 2 + length - 1] = 1
    (tmp_path / "transform1.jpg").write_bytes(bytes(patched))
    assert np.abs(_levels(load_image(tmp_path / "transform1.jpg")) - [76, 255, 28]).max() <= 2


def test_exif_orientation_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" -- stb ignores it, so do we
    Image.new("RGB", (4, 2), (1, 2, 3)).save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (3, 2, 4)


def test_load_python_inputs():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    out = load_image(rgb)
    assert out.shape == (3, 5, 4) and (_levels(out) == rgb).all()
    assert torch.equal(load_image(Image.fromarray(rgb)), out)
    rgba = np.concatenate([rgb, np.zeros((5, 4, 1), np.uint8)], axis=2)
    assert torch.equal(load_image(rgba), out)
    gray = rgb[:, :, 0]
    assert (_levels(load_image(gray)) == gray[:, :, None]).all()
    with pytest.raises(ValueError):
        load_image(rgb.astype(np.float32))
    with pytest.raises(ValueError):
        load_image(np.zeros((5, 4, 2), np.uint8))
    with pytest.raises(TypeError):
        load_image(42)


def test_prepare_input(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    im = load_image(rgb)
    assert torch.equal(prepare_input(tmp_path / "x.png", 8, 8, letterbox=True), letterbox_image(im, 8, 8))
    assert torch.equal(prepare_input(im, 8, 4, letterbox=False), resize_image(im, 8, 4))


def _noisy_jpeg(path: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)


def test_truncated_jpeg_is_an_error(tmp_path):
    path = tmp_path / "cut.jpg"
    _noisy_jpeg(path)
    path.write_bytes(path.read_bytes()[:-600])
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # even if the caller asked Pillow to be lenient
    try:
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    assert "cut.jpg" in str(err.value) and err.value.path == str(path)


def test_truncated_png_is_an_error(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(path)


def test_not_an_image_is_an_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="notes.jpg"):
        load_image(path)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError):
        load_image(tmp_path)  # a directory


# --------------------------------------------------------------------------------------
# JPEG decoders: Pillow (libjpeg) vs Darknet (stb_image)
# --------------------------------------------------------------------------------------

def jpeg_vs_stb(reference_dir: Path) -> list[dict]:
    """For each reference/images/*.jpg: Pillow's decode vs Darknet's ``image_u8``."""
    rows = []
    for jpg in sorted((reference_dir / "images").glob("*.jpg")):
        stb = np.load(jpg.with_suffix(".npz"))["image_u8"].astype(int)  # (3, H, W)
        ours = np.rint(load_image(jpg).numpy() * 255).astype(int)
        row = {"image": jpg.name, "shape": tuple(stb.shape), "same_shape": ours.shape == stb.shape}
        if row["same_shape"]:
            diff = np.abs(ours - stb)
            row.update(max_abs=int(diff.max()), mean_abs=float(diff.mean()),
                       frac_differing=float((diff != 0).mean()))
        rows.append(row)
    return rows


def test_jpeg_decode_close_to_stb(reference_dir):
    rows = jpeg_vs_stb(reference_dir)
    assert rows, "no reference/images/*.jpg"
    for row in rows:
        assert row["same_shape"], row
        assert row["mean_abs"] < 2, row


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import reference_path

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else reference_path()
    print(f"{'image':12} {'C,H,W':>14} {'max|d|':>7} {'mean|d|':>8} {'differing':>10}")
    for r in jpeg_vs_stb(root):
        print(f"{r['image']:12} {str(r['shape']):>14} {r.get('max_abs', '-'):>7} "
              f"{r.get('mean_abs', 0):8.4f} {r.get('frac_differing', 0):10.2%}")
