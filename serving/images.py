"""Turn an uploaded image file into the uint8 pixel array a model expects.

Every failure of Pillow on client bytes is turned into InvalidImage, so nothing a client sends
can escape as a 500. The steps, in order: open (only formats we mean to accept; a file costlier
to read than a photo of its size, serving.image_limits, refused before any pixel is decoded),
decode the first frame (JPEG at reduced size), apply the
EXIF rotation, bring any mode down to 8-bit L/RGB/RGBA, resize, put transparency over white.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from serving import image_limits
from serving.image_limits import InvalidImage

# The formats people upload. Pillow reads dozens more, but each is decoder code that clients could
# aim at, and EPS would run Ghostscript on the upload. JPEG's opener also reads MPO (phone photos).
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")

_MODES = {1: "L", 3: "RGB"}
_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode(data: bytes, height: int, width: int, channels: int, bgr: bool = False) -> np.ndarray:
    """Decode, orient, convert and resize an image file to a (height, width, channels) uint8 array.

    Three channels come in RGB order, or in BGR if `bgr` (packed so as cheaply as RGB)."""
    if channels not in _MODES:
        raise ValueError(f"models with {channels} channels are not supported")
    try:
        image = _normalise(open_image(data, height, width, _MODES[channels]))
        # Resizing before flattening is cheap on big images and gives the same pixels: Pillow
        # resizes RGBA with premultiplied alpha, and "over white" is linear in those.
        image = _flatten(image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0))
        packing = "BGR" if bgr and channels == 3 else _MODES[channels]
        pixels = image.convert(_MODES[channels]).tobytes("raw", packing)
        return np.frombuffer(pixels, np.uint8).reshape(height, width, channels)
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types on corrupt files; all mean "not an image"
        raise InvalidImage(f"the file could not be decoded as an image ({type(exc).__name__})") from None


def open_image(data: bytes, height: int, width: int, mode: str = "RGB") -> Image.Image:
    """The first frame, decoded and upright; for a JPEG at the smallest scale still >= the target.

    `mode` and the target size are hints for JPEG draft mode; the result may be in any mode.
    """
    if not data:
        raise InvalidImage("the image file is empty")
    image_limits.check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage("the file is not an image in a supported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's backstop
        raise InvalidImage(f"the image has more than {image_limits.MAX_PIXELS:,} pixels") from None
    image_limits.check_size(image, data)
    image.seek(0)  # animated images: the first frame
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing, so a 12 MP photo meant for a
    # 224x224 model is never decoded at full size. A square of the larger side keeps the image
    # big enough whichever way EXIF then turns it. Must come before load(); a no-op elsewhere.
    side = max(height, width)
    image.draft(mode, (side, side))
    image.load()
    return _upright(image)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation: phones store the rotation there, not in the pixels."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # broken EXIF damages metadata, not pixels: show the image as stored
        return image
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _normalise(image: Image.Image) -> Image.Image:
    """One of L, RGB or RGBA: 8-bit modes that resize well (P and 1 would resize as NEAREST)."""
    if image.mode in _HIGH_DEPTH:
        image = _to_8bit(image)
    if image.has_transparency_data:  # an alpha band, or a transparent colour / palette entry
        return image if image.mode == "RGBA" else image.convert("RGBA")
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("RGB")  # P, 1, CMYK, YCbCr, LAB, HSV, RGBX: Pillow converts all to RGB


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images to L, scaled: convert() would clip everything over 255."""
    pixels = np.asarray(image)
    if image.mode == "F":  # float images are stored as 0..1
        scaled = np.nan_to_num(pixels, nan=0.0) * 255.0 + 0.5
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    # 16-bit PNG and TIFF (mode I or I;16*): keep the high byte, as Pillow does for 16-bit RGB.
    return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), "L")


def _flatten(image: Image.Image) -> Image.Image:
    """Transparent pixels carry arbitrary colour; show them over white, as a viewer would."""
    if image.mode != "RGBA":
        return image
    return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
