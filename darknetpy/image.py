"""Images as Darknet sees them: ``load_image_color``, ``resize_image``, ``letterbox_image``.

Mirrors Darknet's ``src/image.c`` (pjreddie and AlexeyAB agree on everything here).
Images are ``torch.float32`` tensors laid out ``(C, H, W)`` (planar RGB, like Darknet's
``image.data``) with values ``byte / 255`` in 0..1; no mean/std normalisation.

Decoding uses Pillow where Darknet uses stb_image (``stbi_load(path, ..., 3)``); the
colour-format rules below are stb_image's (v2.19, the copy in ``src/stb_image.h``).
(AlexeyAB built with ``OPENCV=1`` decodes with OpenCV's ``imread`` instead.) Pillow's
libjpeg and stb's JPEG decoder differ by up to 3 levels on a few percent of the bytes
(different IDCT and chroma upsampling; mean 0.01-0.17 levels on Darknet's sample
images), so a JPEG decoded here is not always byte-identical to Darknet's; everything
after decoding is exact.

Darknet quirks reproduced on purpose:

* ``resize_image``'s last output ROW is not copied from the edge (only the last column
  is): it is ``(1-dy) * part[iy]`` with ``sy = (h-1) * h_scale`` in float32. When that
  product rounds just below ``im.h-1`` (about 5% of (im.h, h) pairs, e.g. 2 -> 42, or
  512 -> 402 when letterboxing a 773x512 image to 608) the last row comes out nearly
  black: ``(1-dy)`` is one float32 ulp of ``sy`` (3e-5 for 512 -> 402, 6e-8 for 2 -> 42).
* Letterbox sizes use integer division and a float32 comparison of the two scales.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ImageError

__all__ = ["load_image", "resize_image", "letterbox_image", "letterbox_dims", "prepare_input"]

# image.c load_image_stb: `(float)data[i]/255.` -- the division is in double, then
# rounded to float. A lookup table reproduces it exactly.
_BYTE_TO_FLOAT = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                  Image.DecompressionBombError)


def load_image(source) -> torch.Tensor:
    """Load an image as Darknet's ``load_image_color`` (image.c) does.

    Args:
        source: a file path (``str`` / ``os.PathLike``), a ``PIL.Image.Image``, or a numpy
            ``uint8`` array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA.

    Returns:
        ``torch.float32`` tensor ``(3, H, W)``, RGB, values ``byte / 255`` in 0..1.

    Colour handling follows stb_image (``stbi_load`` with 3 channels):

    * grayscale (``L``, ``1``, 2/4-bit) is replicated to R = G = B; alpha (``LA``, ``RGBA``,
      palette transparency) is dropped, never composited; palettes (``P``) are expanded.
    * 16-bit samples (``I;16*``, 16-bit PNG RGB/RGBA/LA) keep the high byte, ``v >> 8``
      (``stbi__convert_16_to_8``), not Pillow's clipping ``I;16 -> L`` conversion. Mode ``I``
      is treated as 16-bit samples (clipped to 0..65535 first).
    * CMYK JPEG: stb 2.19 handles them itself: with an Adobe APP14 marker (which every
      CMYK JPEG writer emits) ``R = C'*K'/255`` on the stored, Adobe-inverted values, for
      transform 0 (CMYK) and 2 (YCCK, which libjpeg has already turned into CMYK);
      without the marker stb reads the first three channels as YCbCr and ignores the
      fourth, and so does this function. A CMYK image that is not a JPEG (stb cannot read
      it at all) is converted with Pillow's ``convert("RGB")``.
    * Other modes (``F``, ``YCbCr``, ``LAB``, ``HSV``, ``PA``, ...) use Pillow's
      ``convert("RGB")``; stb has no equivalent, so this is not a Darknet path.
    * EXIF orientation is NOT applied (stb ignores it; so does Darknet).
    * GIF: Pillow gives a transparent pixel its palette colour; stb gives it black.
    * A truncated file is an error here; stb would decode it padded with zeros.

    Raises:
        ImageError: the file is missing, unreadable, not an image, or truncated/corrupt
            (the message names the file).
        ValueError: a numpy array that is not ``uint8`` ``(H, W[, 1|3|4])``.
        TypeError: ``source`` is none of the accepted types.
    """
    if isinstance(source, np.ndarray):
        rgb = _rgb_from_array(source)
    elif isinstance(source, Image.Image):
        rgb = _rgb_from_pil(source)
    elif isinstance(source, (str, os.PathLike)):
        rgb = _rgb_from_file(os.fspath(source))
    else:
        raise TypeError(f"load_image: expected a path, PIL.Image or numpy array, "
                        f"got {type(source).__name__}")
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    return torch.from_numpy(_BYTE_TO_FLOAT[chw])


def _rgb_from_file(path: str) -> np.ndarray:
    """Decode a file fully (no silent truncation) to uint8 (H, W, 3)."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # Pillow must raise on a truncated file
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode now, inside the try
            return _rgb_from_pil(img)
    except FileNotFoundError:
        raise ImageError("no such file", path=path) from None
    except UnidentifiedImageError:
        raise ImageError("not an image file (or a format Pillow cannot decode)",
                         path=path) from None
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read image: {e}", path=path) from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _rgb_from_array(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ValueError(f"load_image: a numpy image must be uint8 (H, W), (H, W, 1), "
                         f"(H, W, 3) or (H, W, 4); got {a.dtype} {a.shape}")
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return a[:, :, :3]


def _rgb_from_pil(img: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 (H, W, 3) by stb_image's rules (see load_image)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("RGBA", "RGBX"):
        return np.asarray(img)[:, :, :3]
    if mode == "L":
        return _rgb_from_array(np.asarray(img))
    if mode == "LA":
        return _rgb_from_array(np.asarray(img)[:, :, 0])
    if mode == "I" or mode.startswith("I;16"):
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return _rgb_from_array((v >> 8).astype(np.uint8))  # stbi__convert_16_to_8
    if mode == "CMYK" and img.format == "JPEG":
        return _stb_cmyk_jpeg(np.asarray(img), img.info)
    return np.asarray(img.convert("RGB"))


def _stb_cmyk_jpeg(cmyk: np.ndarray, info: dict) -> np.ndarray:
    """stb_image load_jpeg_image for 4-component JPEGs, from Pillow's decode."""
    stored = 255 - cmyk.astype(np.int64)  # Pillow always undoes Adobe's inversion; redo it
    transform = info.get("adobe_transform") if "adobe" in info else None
    if transform in (0, 2):  # CMYK, or YCCK already converted to (inverted) CMYK by libjpeg
        t = stored[:, :, :3] * stored[:, :, 3:] + 128  # stbi__blinn_8x8(x, k)
        return ((t + (t >> 8)) >> 8).astype(np.uint8)
    if transform is not None:  # other transform: libjpeg decoded it as YCCK, stb as YCbCr
        return np.ascontiguousarray(cmyk[:, :, :3])
    return _stb_ycbcr_to_rgb(stored[:, :, 0], stored[:, :, 1], stored[:, :, 2])


def _stb_ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """stbi__YCbCr_to_RGB_row (the scalar path; stb's SIMD path is only for 4 channels)."""
    def fixed(x: float) -> int:  # stbi__float2fixed
        return int(x * 4096.0 + 0.5) << 8
    y_fixed = (y << 20) + (1 << 19)
    cr, cb = cr - 128, cb - 128
    r = y_fixed + cr * fixed(1.40200)
    g = y_fixed + cr * -fixed(0.71414) + ((cb * -fixed(0.34414)) & ~0xFFFF)  # & 0xffff0000
    b = y_fixed + cb * fixed(1.77200)
    return np.clip(np.stack([r, g, b], axis=2) >> 20, 0, 255).astype(np.uint8)


def _check_image(im: torch.Tensor, fn: str) -> None:
    if not isinstance(im, torch.Tensor) or im.dim() not in (3, 4) or not im.is_floating_point():
        raise ValueError(f"{fn}: expected a float tensor (C, H, W) or (N, C, H, W), got "
                         f"{type(im).__name__} {tuple(getattr(im, 'shape', ()))}")
    if im.shape[-1] < 1 or im.shape[-2] < 1:
        raise ValueError(f"{fn}: empty image {tuple(im.shape)}")


def _check_size(w: int, h: int, fn: str, minimum: int) -> None:
    if int(w) != w or int(h) != h or w < minimum or h < minimum:
        raise ValueError(f"{fn}: width and height must be integers >= {minimum}, got {w}x{h}")


def _scale(n_in: int, n_out: int) -> torch.Tensor:
    """``(float)(n_in - 1) / (n_out - 1)`` in float32 (0 when n_out == 1, see resize_image)."""
    s = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    return torch.tensor(s, dtype=torch.float32)


def _positions(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index (int, truncated) and fraction (float32) of each output position."""
    s = torch.arange(n_out, dtype=torch.float32, device=device) * _scale(n_in, n_out).to(device)
    i = s.to(torch.int64)  # (int) sx; sx >= 0 so truncation == floor
    return i.clamp(max=n_in - 1), s - i.to(torch.float32)


def resize_image(im: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Bilinear resize exactly as Darknet's ``resize_image`` (image.c).

    Args:
        im: float tensor ``(C, H, W)`` or ``(N, C, H, W)``, any value range (computed in float32).
        w, h: output width and height in pixels (>= 0).

    Returns:
        ``torch.float32`` tensor ``(C, h, w)`` (or ``(N, C, h, w)``).

    Two separable float32 passes with ``scale = (float)(in-1)/(out-1)`` (align-corners):
    horizontal ``(1-dx)*p[ix] + dx*p[ix+1]`` with ``sx = c*w_scale``, ``ix = (int)sx``,
    ``dx = sx-ix``; the last column (or every column when ``im.w == 1``) copies the
    input's last column. Vertical ``(1-dy)*part[iy]`` plus ``dy*part[iy+1]`` except on the
    last row or when ``im.h == 1``: the last row is NOT copied from the edge (see the
    module docstring). ``h == 1``: Darknet computes ``sy = 0 * inf = NaN`` and reads out
    of bounds (undefined behaviour); here the scale is taken as 0, giving input row 0.
    Same-size resizes return an unchanged copy (as AlexeyAB's early return does, and
    pjreddie's arithmetic does anyway).

    Raises:
        ValueError: ``im`` is not a non-empty float 3-D/4-D tensor, or ``w``/``h`` < 0.
    """
    _check_image(im, "resize_image")
    _check_size(w, h, "resize_image", 0)
    x = im.to(torch.float32)
    in_h, in_w = x.shape[-2:]

    # Horizontal pass: (..., H, W) -> (..., H, w)
    ix, dx = _positions(in_w, w, x.device)
    part = (1 - dx) * x[..., ix] + dx * x[..., (ix + 1).clamp(max=in_w - 1)]
    edge = (torch.arange(w, device=x.device) == w - 1) | (in_w == 1)  # copy the last column
    part = torch.where(edge, x[..., in_w - 1:], part)

    # Vertical pass: (..., H, w) -> (..., h, w); the dy term is skipped on the last row
    iy, dy = _positions(in_h, h, x.device)
    dy = dy[:, None]  # (h, 1)
    out = (1 - dy) * part[..., iy, :]
    with_dy = out + dy * part[..., (iy + 1).clamp(max=in_h - 1), :]
    interior = (torch.arange(h, device=x.device)[:, None] != h - 1) & (in_h != 1)
    return torch.where(interior, with_dy, out)


def letterbox_dims(im_w: int, im_h: int, net_w: int, net_h: int) -> tuple[int, int]:
    """Size ``(new_w, new_h)`` of the image inside Darknet's letterbox (image.c: letterbox_image).

    ``if ((float)net_w/im_w < (float)net_h/im_h)`` (float32): ``new_w = net_w``,
    ``new_h = im_h*net_w/im_w``; else ``new_h = net_h``, ``new_w = im_w*net_h/im_h``
    (integer division). The same numbers undo the letterbox in
    ``correct_yolo_boxes``/``correct_region_boxes``. All values are pixels.

    Raises:
        ValueError: a size is not a positive integer.
    """
    _check_size(im_w, im_h, "letterbox_dims", 1)
    _check_size(net_w, net_h, "letterbox_dims", 1)
    if np.float32(net_w) / np.float32(im_w) < np.float32(net_h) / np.float32(im_h):
        return int(net_w), int(im_h * net_w // im_w)
    return int(im_w * net_h // im_h), int(net_h)


def letterbox_image(im: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """Darknet's ``letterbox_image`` (image.c): keep aspect ratio, pad with 0.5.

    Args:
        im: float tensor ``(C, H, W)`` or ``(N, C, H, W)``, values 0..1.
        w, h: network input width and height in pixels (>= 1).

    Returns:
        ``torch.float32`` tensor ``(C, h, w)`` (or ``(N, C, h, w)``): the image resized with
        :func:`resize_image` to :func:`letterbox_dims` and placed at
        ``((w-new_w)/2, (h-new_h)/2)`` (integer division) on a canvas of 0.5.
        A ``new_w``/``new_h`` of 0 (extremely elongated images) leaves the canvas empty.

    Raises:
        ValueError: bad tensor or size.
    """
    _check_image(im, "letterbox_image")
    _check_size(w, h, "letterbox_image", 1)
    new_w, new_h = letterbox_dims(im.shape[-1], im.shape[-2], w, h)
    resized = resize_image(im, new_w, new_h)
    boxed = torch.full((*im.shape[:-2], h, w), 0.5, dtype=torch.float32, device=im.device)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    boxed[..., dy:dy + new_h, dx:dx + new_w] = resized  # embed_image
    return boxed


def prepare_input(image, net_w: int, net_h: int, letterbox: bool) -> torch.Tensor:
    """The network input Darknet builds from an image: letterboxed or stretched.

    Args:
        image: a float tensor ``(C, H, W)`` / ``(N, C, H, W)`` in 0..1, or anything
            :func:`load_image` accepts (path, PIL image, uint8 array).
        net_w, net_h: the cfg's ``[net] width``/``height`` in pixels.
        letterbox: True -> :func:`letterbox_image` (pjreddie ``detect``/``classifier``,
            AlexeyAB with ``letter_box=1``); False -> :func:`resize_image` (AlexeyAB default).

    Returns:
        ``torch.float32`` tensor ``(3, net_h, net_w)`` (or with the batch dim kept).

    Raises:
        ImageError, ValueError, TypeError: as :func:`load_image` / :func:`resize_image`.
    """
    im = image if isinstance(image, torch.Tensor) else load_image(image)
    return letterbox_image(im, net_w, net_h) if letterbox else resize_image(im, net_w, net_h)
