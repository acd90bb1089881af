"""Real images of every common kind get a 200, and the decode details that matter are right.

The images are made here with Pillow: a few kilobytes each, except the 12-megapixel photo.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps

from serving import images
from tests.conftest import upload
from tests.make_corpus import encode, valid_images

ORIENTATION = ExifTags.Base.Orientation


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    """An RGB picture whose every region differs, so a wrong turn or crop would show."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


def quadrants(width: int = 40, height: int = 20) -> Image.Image:
    """A grayscale image with four flat quadrants: top-left 0, top-right 80, bottom-left 160, bottom-right 240."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[: height // 2, width // 2 :] = 80
    pixels[height // 2 :, : width // 2] = 160
    pixels[height // 2 :, width // 2 :] = 240
    return Image.fromarray(pixels)


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[ORIENTATION] = orientation
    return tags.tobytes()


def frames(*colours: str, size: tuple[int, int] = (16, 16)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in colours]


def animation(fmt: str, **options: object) -> bytes:
    first, *rest = frames("red", "lime", "blue")
    return encode(first, fmt, save_all=True, append_images=rest, **options)


@functools.cache
def photo_12mp() -> bytes:
    """A 4000 x 3000 JPEG with smooth content and some texture: about 2 MB, like a phone photo."""
    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    texture = np.random.default_rng(0).normal(0, 12, (3000, 4000)).astype(np.float32)
    red = 128 + 100 * np.sin(x / 300) + texture
    green = 128 + 100 * np.cos(y / 250) + texture
    blue = 255 * (x + y) / 7000
    pixels = np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=85)


REAL_IMAGES: dict[str, Callable[[], bytes]] = {
    "grayscale.png": lambda: encode(gradient().convert("L"), "PNG"),
    "grayscale.jpg": lambda: encode(gradient().convert("L"), "JPEG"),
    "rgb.jpg": lambda: encode(gradient(), "JPEG"),
    "progressive.jpg": lambda: encode(gradient(), "JPEG", progressive=True),
    "rgba.png": lambda: encode(transparent_corner(), "PNG"),
    "palette.png": lambda: encode(gradient().convert("P"), "PNG"),
    "palette_transparent.png": lambda: encode(gradient().convert("P"), "PNG", transparency=0),
    "cmyk.jpg": lambda: encode(gradient().convert("CMYK"), "JPEG"),
    "16bit.png": lambda: encode(Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21), "PNG"),
    "animated.gif": lambda: animation("GIF"),
    "animated.png": lambda: animation("PNG"),
    "animated.webp": lambda: animation("WEBP", lossless=True),
    "exif_rotated.jpg": lambda: encode(gradient(), "JPEG", exif=exif(6)),
    "broken_exif.jpg": lambda: encode(gradient(), "JPEG", exif=b"Exif\0\0MM\0*\0\0\0\x08\xff\xff\0\0"),
    "lossy.webp": lambda: encode(gradient(), "WEBP", quality=80),
    "lossless.webp": lambda: encode(transparent_corner(), "WEBP", lossless=True),
    "1x1.png": lambda: encode(Image.new("RGB", (1, 1), "red"), "PNG"),
    "1x1.jpg": lambda: encode(Image.new("L", (1, 1), 200), "JPEG"),
    "bmp": lambda: encode(gradient(), "BMP"),
    "tiff": lambda: encode(gradient(), "TIFF", compression="tiff_lzw"),
    "mpo (phone multi-picture JPEG)": lambda: animation("MPO"),
    "12mp.jpg": photo_12mp,
}


def transparent_corner() -> Image.Image:
    image = gradient().convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 32, 24))
    return image


@pytest.mark.parametrize("name", REAL_IMAGES)
def test_real_images_are_served(served, client, name):
    response = upload(client, REAL_IMAGES[name](), top_k=3)

    assert response.status_code == 200, response.text
    assert len(response.json["predictions"]) == 3
    assert served.computed == [response.headers["X-Request-ID"]]


@pytest.mark.parametrize("name", valid_images())
def test_every_fuzz_seed_decodes(name):
    """The fuzz test mutates these; each must be valid to start with, in both model shapes."""
    data = valid_images()[name]
    assert images.decode(data, 8, 8, 1).shape == (8, 8, 1)
    assert images.decode(data, 224, 224, 3).shape == (224, 224, 3)


# EXIF orientation


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_the_upright_image(fmt, orientation):
    """Lossless formats, so the file with the EXIF tag and the one turned upright must give equal pixels."""
    tagged = encode(quadrants(), fmt, exif=exif(orientation), **_lossless(fmt))
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))
    # A target of the other aspect ratio: rotating after the resize could not give these pixels.
    expected = images.decode(encode(upright, "PNG"), 16, 6, 1)

    assert np.array_equal(images.decode(tagged, 16, 6, 1), expected)


def test_orientation_6_turns_the_image_clockwise_before_resizing():
    """Not only equal to Pillow's answer: the quadrants land where a viewer shows them."""
    tagged = encode(quadrants(), "PNG", exif=exif(6))  # stored 40 wide, 20 high; shown 20 x 40

    out = images.decode(tagged, 40, 20, 1)[:, :, 0]

    corners = [out[5, 5], out[5, 15], out[35, 5], out[35, 15]]  # top-left, top-right, bottom-left, ...
    assert corners == [160, 0, 240, 80]


def test_orientation_in_a_jpeg_is_applied():
    tagged = encode(quadrants().convert("RGB"), "JPEG", quality=95, exif=exif(6))

    out = images.decode(tagged, 40, 20, 1)[:, :, 0].astype(int)

    corners = [out[5, 5], out[5, 15], out[35, 5], out[35, 15]]
    np.testing.assert_allclose(corners, [160, 0, 240, 80], atol=8)


@pytest.mark.parametrize(
    "junk",
    [
        b"Exif\0\0MM\0*\0\0\0\x08\xff\xff\0\0",  # an IFD claiming 65535 entries
        b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x09\0\0\0",  # orientation 9
        b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x02\0\x04\0\0\0abc\0\0\0\0\0",  # orientation as text
        b"Exif\0\0garbage",
    ],
)
def test_broken_exif_leaves_the_image_as_stored(junk):
    plain = images.decode(encode(gradient(), "PNG"), 24, 32, 3)

    assert np.array_equal(images.decode(encode(gradient(), "PNG", exif=junk), 24, 32, 3), plain)


def test_bgr_packing_reverses_the_channels_of_colour_and_leaves_gray_alone():
    data = encode(gradient(), "PNG")
    rgb = images.decode(data, 24, 32, 3)
    assert rgb[..., 0].any() and not np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.array_equal(images.decode(data, 24, 32, 3, bgr=True), rgb[..., ::-1])
    assert np.array_equal(images.decode(data, 24, 32, 1, bgr=True), images.decode(data, 24, 32, 1))


# Animations, depth, colour modes, transparency


@pytest.mark.parametrize(
    "data",
    [
        animation("GIF"),
        animation("PNG"),
        animation("WEBP", lossless=True),
        animation("TIFF"),
        animation("MPO", quality=95),
    ],
    ids=["gif", "apng", "webp", "multipage-tiff", "mpo"],
)
def test_the_first_frame_is_used(data):
    red = images.decode(data, 4, 4, 3).reshape(-1, 3).astype(int)

    np.testing.assert_allclose(red, np.tile([255, 0, 0], (16, 1)), atol=3)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(fmt):
    levels = np.array([[0, 4096, 16384, 32768, 49152, 65535]], np.uint16)

    out = images.decode(encode(Image.fromarray(levels), fmt), 1, 6, 1).ravel()

    # convert("L") would clip: [0, 255, 255, 255, 255, 255]
    np.testing.assert_allclose(out, [0, 16, 64, 128, 192, 255], atol=1)


def test_float_and_32_bit_images_are_scaled():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    ints = Image.fromarray(np.array([[0, 32768, 65535, 70000]], np.int32))

    np.testing.assert_allclose(images.decode(encode(floats, "TIFF"), 1, 4, 1).ravel(), [0, 128, 255, 0], atol=1)
    np.testing.assert_allclose(images.decode(encode(ints, "TIFF"), 1, 4, 1).ravel(), [0, 128, 255, 255], atol=1)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "LAB", "YCbCr", "I;16", "LA", "RGBA"])
@pytest.mark.parametrize("channels", [1, 3])
def test_colour_modes_convert_to_the_model_mode(mode, channels):
    stored = in_mode(gradient(), mode)
    # What the file really holds: gray for gray modes, the palette's colours for P.
    truth = stored.convert("RGB") if mode == "P" else gradient().convert("L" if mode in GRAY else "RGB")
    expected = np.asarray(truth.convert("L" if channels == 1 else "RGB"), np.float64).reshape(48, 64, channels)

    out = images.decode(encode(stored, "TIFF"), 48, 64, channels)

    assert out.shape == (48, 64, channels) and out.dtype == np.uint8
    if mode != "1":  # dithered to black and white: only the shape can be compared
        assert np.abs(out - expected).mean() < 3


GRAY = ("1", "L", "LA", "I;16")


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "LAB":  # convert() cannot make LAB; a colour transform can
        srgb, lab = ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(srgb, lab, "RGB", "LAB"))
    if mode == "I;16":  # convert() would keep 0..255; a real 16-bit image spans 0..65535
        return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    return image.convert(mode)


def test_transparent_pixels_go_over_white():
    pixels = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128], [0, 0, 255, 0]]], np.uint8)

    out = images.decode(encode(Image.fromarray(pixels, "RGBA"), "PNG"), 1, 4, 3)[0]

    np.testing.assert_allclose(out, [[255, 255, 255], [255, 0, 0], [127, 127, 127], [255, 255, 255]], atol=1)


def test_transparency_survives_downscaling():
    """Half transparent black, half opaque red, shrunk to one pixel: pink, as a viewer would show it.

    Averaging colours without weighting by alpha would bring the black in: a dark red.
    """
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[:, 1] = [255, 0, 0, 255]

    out = images.decode(encode(Image.fromarray(pixels, "RGBA"), "PNG"), 1, 1, 3).ravel()

    np.testing.assert_allclose(out, [255, 128, 128], atol=2)


@pytest.mark.parametrize(
    "image, options",
    [
        (Image.new("P", (2, 1)), {"transparency": 0}),  # palette entry 0 transparent
        (Image.new("L", (2, 1)), {"transparency": 0}),  # grayscale colour key
        (Image.new("RGB", (2, 1)), {"transparency": (0, 0, 0)}),  # RGB colour key
        (Image.new("LA", (2, 1)), {}),
    ],
    ids=["palette", "grayscale-key", "rgb-key", "LA"],
)
def test_every_kind_of_png_transparency_goes_over_white(image, options):
    out = images.decode(encode(image, "PNG", **options), 1, 2, 3)

    assert (out == 255).all()


def test_cmyk_jpeg_keeps_its_colours():
    red = Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK")

    out = images.decode(encode(red, "JPEG", quality=95), 4, 4, 3).reshape(-1, 3).astype(int)

    np.testing.assert_allclose(out.mean(axis=0), [220, 30, 30], atol=12)


def test_a_1x1_image_fills_the_model_input():
    out = images.decode(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), 224, 224, 3)

    assert out.shape == (224, 224, 3)
    assert (out.reshape(-1, 3) == [10, 200, 30]).all()


# JPEG draft mode


def test_a_12mp_jpeg_is_decoded_at_one_eighth_size():
    """draft() lets libjpeg decode at 1/8 scale: 500 x 375 for 224 x 224, not 4000 x 3000."""
    assert images.open_image(photo_12mp(), 224, 224).size == (500, 375)
    assert images.open_image(photo_12mp(), 8, 8, "L").mode == "L"  # libjpeg makes the grayscale too


def test_draft_mode_keeps_the_picture():
    drafted = images.decode(photo_12mp(), 224, 224, 3).astype(int)
    full = np.asarray(Image.open(io.BytesIO(photo_12mp())).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))

    assert np.abs(drafted - full).mean() < 3


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_leaves_enough_pixels_whichever_way_the_photo_turns(orientation):
    panorama = encode(gradient(6000, 1000), "JPEG", exif=exif(orientation))

    opened = images.open_image(panorama, 224, 224)

    assert min(opened.size) >= 224 and max(opened.size) <= 6000 // 4  # drafted, and still big enough


def test_other_formats_are_decoded_at_full_size():
    assert images.open_image(encode(gradient(900, 700), "PNG"), 224, 224).size == (900, 700)


def _lossless(fmt: str) -> dict:
    return {"lossless": True} if fmt == "WEBP" else {}
