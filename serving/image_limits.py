"""What an image file may cost to read: files far costlier than a photo of their size are refused before Pillow
decodes them, the pixel limits included. serving.images calls check_structure before Pillow opens a file and
check_size once it has read its header.
"""

from __future__ import annotations

import re

from PIL import Image

# A 12-megapixel photo must work; far beyond 50 MP is a decompression bomb, not a photo.
MAX_PIXELS = 50_000_000
# Pillow's own check stays as a backstop (it errors at twice this); ours runs first, in check_size.
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


class InvalidImage(ValueError):
    """The upload is not an image we can read; the message is for the client."""


def check_size(image: Image.Image, data: bytes) -> None:
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


def check_structure(data: bytes) -> None:
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
