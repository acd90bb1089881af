"""Write the hostile-input corpus in tests/corpus/: `python tests/make_corpus.py` (deterministic).

The files are committed, so the tests never depend on this script; rerun it only to change them,
and keep tests/corpus/README.md in step. Big inputs (the oversize upload, the 12 MP photo) are
made at test time instead, to keep the repository small.
"""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"


def _photo() -> Image.Image:
    """A small RGB picture with some structure, so every codec has real work to do."""
    y, x = np.mgrid[0:48, 0:64]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with almost no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb_complete(side: int) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels: zlib shrinks it about 1000 times."""
    row = b"\0" + b"\0" * ((side + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A GIF whose logical screen is 65535 x 65535 around one 1x1 frame."""
    gif = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    return bytes(gif)


def jpeg_bomb() -> bytes:
    """A JPEG whose frame header (SOF0) claims 65500 x 65500 pixels."""
    jpeg = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65500, 65500)  # height, width
    return bytes(jpeg)


def webp_wide_canvas() -> bytes:
    """An animated WebP of two 16x16 frames on a 3,000,000 x 16 canvas: 200 bytes, seconds to decode."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green")]
    webp = bytearray(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    vp8x = webp.index(b"VP8X")
    webp[vp8x + 12 : vp8x + 18] = (3_000_000 - 1).to_bytes(3, "little") + (16 - 1).to_bytes(3, "little")
    return bytes(webp)


def valid_images() -> dict[str, bytes]:
    """One small valid file per accepted format and common variant: the seeds the fuzz test mutates."""
    photo, rng = _photo(), np.random.default_rng(0)
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.convert("L").convert("RGB")]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return {
        "jpeg": encode(photo, "JPEG", exif=exif.tobytes()),
        "progressive.jpeg": encode(photo, "JPEG", progressive=True, quality=70),
        "cmyk.jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "png": encode(photo, "PNG"),
        "rgba.png": encode(photo.convert("RGBA"), "PNG"),
        "palette.png": encode(photo.convert("P"), "PNG", transparency=0),
        "16bit.png": encode(Image.fromarray(rng.integers(0, 65536, (24, 32), np.uint16)), "PNG"),
        "apng.png": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(photo, "WEBP", quality=80),
        "lossless.webp": encode(photo.convert("RGBA"), "WEBP", lossless=True),
        "animated.webp": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "bmp": encode(photo, "BMP"),
        "palette.bmp": encode(photo.convert("P"), "BMP"),
        "tiff": encode(photo, "TIFF", compression="tiff_lzw", exif=exif.tobytes()),
        "multipage.tiff": encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "mpo": encode(frames[0], "MPO", save_all=True, append_images=frames[1:]),
        "avif": encode(photo, "AVIF", quality=60),
    }


def files() -> dict[str, bytes]:
    photo = _photo()
    jpeg, png, gif = encode(photo, "JPEG", quality=90), encode(photo, "PNG"), encode(photo, "GIF")
    return {
        "empty.bin": b"",
        "text.txt": b"This is a text file, not an image.\n",
        "page.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>\n',
        "vector.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "truncated.gif": gif[: len(gif) // 2],
        "bomb_header.png": png_bomb_header(60000, 60000),
        "bomb_100mp.png": png_bomb_complete(10000),
        "bomb.gif": gif_bomb(),
        "bomb.jpg": jpeg_bomb(),
        "wide_canvas.webp": webp_wide_canvas(),
        "invalid_base64.json": b'{"image": "this is *not* base64!"}\n',
        "not_an_object.json": b'["image", "iVBORw0KGgo="]\n',
    }


def main() -> None:
    CORPUS.mkdir(exist_ok=True)
    for name, data in files().items():
        (CORPUS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
