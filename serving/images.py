"""Turn an uploaded image file into the uint8 pixel array a model expects.

Every failure of Pillow on client bytes is turned into InvalidImage, so nothing a client sends
can escape as a 500. The steps, in order: open (only formats we mean to accept, pixel count
checked before any pixel is decoded), decode the first frame (JPEG at reduced size), apply the
EXIF rotation, bring any mode down to 8-bit L/RGB/RGBA, resize, put transparency over white.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

# A 12-megapixel photo must work; far beyond 50 MP is a decompression bomb, not a photo.
MAX_PIXELS = 50_000_000
# Pillow's own check stays as a backstop (it errors at twice this); ours runs first, in open_image.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The most JPEG and GIF can store. Wider is no photo but a trick: a 200-byte animated WebP whose
# canvas is 3,000,000 x 16 pixels costs Pillow seconds, as its read loop is quadratic in row length.
MAX_SIDE = 65535

# A picture with more pixels than this per byte of its file is a decompression bomb (a 37-byte GIF, a 38-byte
# WebP declaring 7000x7000): the best real compression, deflate on a 1-bit PNG, reaches about 8,300.
# Below CHEAP_PIXELS a bomb costs little to decode (a solid colour compresses that well, too).
MAX_PIXELS_PER_BYTE = 10_000
CHEAP_PIXELS = 4_000_000
# The structure past which a file is a bomb, not a photo (cameras write up to about a dozen JPEG scans and two
# dozen segments or PNG chunks): libjpeg decodes a progressive JPEG a scan at a time over the whole image (a
# 1.8 MB file of 60,000 tiny scans held a web worker for a minute), and Pillow reads a JPEG's header a marker at
# a time, and any junk between markers a byte at a time, in Python (3.9 million empty comments: 11 s), a PNG's
# chunks one at a time (1.3 million private chunks before its pixels: 4.6 s; after them, or a million 1-byte
# IDATs: 2.5 s), and a TIFF's numbers one at a time, a Python object each (6 million tiles: 10 s to open,
# 32 s and 2 GB to decode). A TIFF may have a strip a row, so up to MAX_SIDE of them.
MAX_JPEG_SCANS = 100
# And a scan costs as much as the image has pixels: 100 scans of 7000x7000 took 3 s. Photos have about ten.
MAX_JPEG_SCAN_PIXELS = 20 * MAX_PIXELS
MAX_SEGMENTS = 1000
MAX_JPEG_JUNK = 64 * 1024
MAX_PNG_CHUNKS = 100_000
MAX_TIFF_VALUES = 65535
# TIFF field types that Pillow unpacks a number at a time (not BYTE, ASCII or UNDEFINED, read as bytes).
_TIFF_NUMBERS = {3, 4, 5, 8, 9, 10, 11, 12, 13, 16, 17, 18}
# Pillow reads a GIF's extension blocks before its first image a sub-block at a time, in Python: one comment of
# 7.5 million 1-byte sub-blocks took 1.6 s and 640 MB. A photo's GIF has a few; XMP data a few hundred.
MAX_GIF_BLOCKS = 10_000
# Pillow decodes RLE-compressed BMP in Python, a byte at a time: 5.4 s for a 7 KB file of 50 MP.
_BMP_RLE = (1, 2)
_FILL = re.compile(rb"\xff+")

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


class InvalidImage(ValueError):
    """The upload is not an image we can read; the message is for the client."""


def decode(data: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """Decode, orient, convert and resize an image file to a (height, width, channels) uint8 array."""
    if channels not in _MODES:
        raise ValueError(f"models with {channels} channels are not supported")
    try:
        image = _normalise(open_image(data, height, width, _MODES[channels]))
        # Resizing before flattening is cheap on big images and gives the same pixels: Pillow
        # resizes RGBA with premultiplied alpha, and "over white" is linear in those.
        image = _flatten(image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0))
        return np.asarray(image.convert(_MODES[channels]), np.uint8).reshape(height, width, channels)
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
    _check_structure(data)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage("the file is not an image in a supported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's backstop
        raise InvalidImage(f"the image has more than {MAX_PIXELS:,} pixels") from None
    _check_size(image, data)
    image.seek(0)  # animated images: the first frame
    # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost nothing, so a 12 MP photo meant for a
    # 224x224 model is never decoded at full size. A square of the larger side keeps the image
    # big enough whichever way EXIF then turns it. Must come before load(); a no-op elsewhere.
    side = max(height, width)
    image.draft(mode, (side, side))
    image.load()
    return _upright(image)


def _check_size(image: Image.Image, data: bytes) -> None:
    """Refuse an opened image whose pixels would cost far more to decode than a photo of its file's size."""
    pixels, file_bytes = image.width * image.height, len(data)
    if pixels > MAX_PIXELS or max(image.size) > MAX_SIDE:
        raise InvalidImage(
            f"the image is {image.width}x{image.height} pixels; the most accepted is {MAX_PIXELS:,} pixels, "
            f"{MAX_SIDE} on a side"
        )
    if pixels > max(CHEAP_PIXELS, MAX_PIXELS_PER_BYTE * file_bytes):
        raise InvalidImage(
            f"the image declares {image.width}x{image.height} pixels in a file of {file_bytes:,} bytes: "
            "a decompression bomb, not a picture"
        )
    if image.format in ("JPEG", "MPO") and data.count(b"\xff\xda") * pixels > MAX_JPEG_SCAN_PIXELS:
        raise InvalidImage(f"the JPEG has more scans than a photo of {image.width}x{image.height} pixels")
    if image.format == "BMP" and image.info.get("compression") in _BMP_RLE and pixels > CHEAP_PIXELS:
        raise InvalidImage(f"an RLE-compressed BMP of over {CHEAP_PIXELS:,} pixels; send it uncompressed or as PNG")


def _check_structure(data: bytes) -> None:
    """Refuse a file whose structure would cost far more to read than a photo's, before Pillow reads any of it."""
    if data.startswith(b"\xff\xd8\xff"):  # JPEG, and MPO
        _check_jpeg(data)
    elif data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF, and BigTIFF
        _check_tiff(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data)


def _check_jpeg(data: bytes) -> None:
    """Refuse a JPEG whose header or scans would cost far more to read than a photo's (MAX_JPEG_*). Walks the
    header a segment at a time, as Pillow will, skipping runs in C, and counts the scans in C: a marker can stand
    nowhere else, as the data between markers escapes every 0xFF."""
    at, segments, junk = 2, 0, 0
    while at < len(data) - 3 and segments <= MAX_SEGMENTS and junk <= MAX_JPEG_JUNK:
        if data[at] != 0xFF:  # junk, which Pillow skips a byte at a time
            following = data.find(b"\xff", at)
            following = len(data) if following < 0 else following
            junk, at = junk + following - at, following
            continue
        marker = _FILL.match(data, at).end()  # the byte after any fill (0xFF bytes), each also skipped alone
        junk, at = junk + marker - at - 1, marker - 1
        if marker == len(data) or data[marker] == 0xDA:  # the first scan: what follows is libjpeg's, in C
            break
        if data[marker] == 0x00:  # an escaped 0xFF out of place
            junk, at = junk + 2, at + 2
        else:
            segments += 1
            standalone = data[marker] == 0x01 or 0xD0 <= data[marker] <= 0xD9
            at += 2 if standalone else 2 + int.from_bytes(data[marker + 1 : marker + 3], "big")
    if segments > MAX_SEGMENTS or junk > MAX_JPEG_JUNK:
        raise InvalidImage(f"the JPEG's header has more than {MAX_SEGMENTS} segments, or junk between them")
    if data.count(b"\xff\xda", at) > MAX_JPEG_SCANS:
        raise InvalidImage(f"the JPEG has more than {MAX_JPEG_SCANS} scans")


def _check_png(data: bytes) -> None:
    """Refuse a PNG of more than MAX_SEGMENTS chunks before its pixels, or MAX_PNG_CHUNKS in all."""
    at, before_pixels = 8, True
    for chunk in range(MAX_PNG_CHUNKS + 1):
        if at + 8 > len(data):  # the end, or a file cut short, which Pillow tells of
            return
        kind = data[at + 4 : at + 8]
        before_pixels = before_pixels and kind != b"IDAT"
        if before_pixels and chunk >= MAX_SEGMENTS:
            raise InvalidImage(f"the PNG has more than {MAX_SEGMENTS} chunks before its pixels")
        at += 12 + int.from_bytes(data[at : at + 4], "big")  # length, type, data, CRC
    raise InvalidImage(f"the PNG has more than {MAX_PNG_CHUNKS:,} chunks")


def _check_tiff(data: bytes) -> None:
    """Refuse a TIFF whose first directory (the frame we decode) holds more than MAX_SEGMENTS fields, or a field of
    more than MAX_TIFF_VALUES numbers (strip or tile offsets, resolutions...)."""
    order, big = ("little" if data[:2] == b"II" else "big"), data[2:4] in (b"+\x00", b"\x00+")
    word, entry = (8, 20) if big else (4, 12)  # offsets and counts; one field's entry

    def number(at: int, size: int) -> int:
        return int.from_bytes(data[at : at + size], order)

    directory = number(8 if big else 4, word)
    fields = number(directory, 8 if big else 2)
    if fields > MAX_SEGMENTS:
        raise InvalidImage(f"the TIFF has more than {MAX_SEGMENTS} fields in its first directory")
    first = directory + (8 if big else 2)
    for at in range(first, first + fields * entry, entry):
        if number(at + 2, 2) in _TIFF_NUMBERS and number(at + 4, word) > MAX_TIFF_VALUES:
            raise InvalidImage(f"a field of the TIFF holds more than {MAX_TIFF_VALUES:,} numbers")


def _check_gif(data: bytes) -> None:
    """Refuse a GIF of more than MAX_GIF_BLOCKS extension blocks and sub-blocks before its first image."""
    flags = data[10] if len(data) > 10 else 0
    at, blocks = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0), 0  # past the header and colour table
    while at < len(data) and data[at] == 0x21 and blocks <= MAX_GIF_BLOCKS:  # an extension
        at += 2  # its introducer and label
        while at < len(data) and data[at] and blocks <= MAX_GIF_BLOCKS:  # its sub-blocks, each length first
            at, blocks = at + 1 + data[at], blocks + 1
        at, blocks = at + 1, blocks + 1  # its terminator
    if blocks > MAX_GIF_BLOCKS:
        raise InvalidImage(f"the GIF has more than {MAX_GIF_BLOCKS:,} extension blocks before its first image")


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
