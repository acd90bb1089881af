"""Turn an uploaded image file into the uint8 pixel array a model expects.

Every failure of Pillow on client bytes is turned into InvalidImage, so nothing a client sends
can escape as a 500.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# A 12-megapixel photo must work; far beyond 50 MP is a decompression bomb, not a photo.
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

_MODES = {1: "L", 3: "RGB"}


class InvalidImage(ValueError):
    """The upload is not an image we can read; the message is for the client."""


def decode(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """Decode, orient, convert and resize an image file to a (height, width, channels) uint8 array."""
    if channels not in _MODES:
        raise ValueError(f"models with {channels} channels are not supported")
    if not data:
        raise InvalidImage("the image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(data, height, width)
            image = _to_mode(image, _MODES[channels])
            image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, np.uint8).reshape(height, width, channels)
    except InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidImage(f"the image has more than {MAX_PIXELS:,} pixels") from None
    except Exception as exc:  # Pillow raises many types on corrupt files; all mean "not an image"
        raise InvalidImage(f"the file could not be decoded as an image ({type(exc).__name__})") from None


def _open(data: bytes, height: int, width: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing: a 12 MP photo meant for a
    # 224x224 model never gets decoded at full size.
    image.draft("RGB", (width, height))
    image.seek(0)  # animated images: the first frame
    image.load()
    return ImageOps.exif_transpose(image)  # phones store the rotation in EXIF, not the pixels


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colour; show them over white, as a viewer would.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images: scale to 0..255 instead of letting convert() clip them."""
    pixels = np.asarray(image, np.float64)
    top = 1.0 if image.mode == "F" else 65535.0
    return Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).astype(np.uint8), "L")
