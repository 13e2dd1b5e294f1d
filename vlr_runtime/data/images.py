"""Safe image decoding: nothing is decoded before its declared size has been checked, nothing half-loaded survives.

Order of checks for one file: exists -> non-empty -> PIL identifies it from the header -> declared ``w*h`` against
the pixel cap (decompression bombs are rejected here, before any pixel is decoded) -> aspect ratio <= 200 ->
full decode (a truncated or corrupt file raises here; PIL's ``LOAD_TRUNCATED_IMAGES`` must stay off) -> EXIF
orientation -> RGB (transparency composited on white, grey/palette expanded) exactly as transformers'
``convert_to_rgb`` does for the Qwen2-VL image processor.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlr_runtime.data.errors import DataError

DEFAULT_MAX_DECODE_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 200.0


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of ``image``; anything with transparency is alpha-composited on opaque white first."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _checked(p: Path, max_pixels: int, decode: bool) -> Image.Image | tuple[int, int]:
    if not p.is_file():
        raise DataError("image_missing", f"{p} does not exist")
    if p.stat().st_size == 0:
        raise DataError("image_unreadable", f"{p.name} is an empty file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on: truncated images would load half; turn it off")
    try:
        with warnings.catch_warnings():
            # PIL warns (and at 2x its own limit raises) about bombs on open; our cap below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                width, height = im.size
                if width <= 0 or height <= 0:
                    raise DataError("image_unreadable", f"{p.name} declares size {width}x{height}")
                if width * height > max_pixels:
                    raise DataError("image_bomb", f"{p.name} declares {width}x{height} > cap of {max_pixels} pixels")
                if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
                    raise DataError("image_aspect_ratio", f"{p.name} is {width}x{height}: ratio > {MAX_ASPECT_RATIO:g}")
                if not decode:
                    return width, height
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError("image_bomb", f"{p.name}: {e}") from None
    except UnidentifiedImageError:
        raise DataError("image_unreadable", f"{p.name} is not a recognised image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError("image_unreadable", f"{p.name} is corrupt or truncated ({e})") from None


def decode_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> Image.Image:
    """Decode ``path`` into an RGB PIL image after the safety checks above.

    Args:
        max_pixels: cap on the *declared* ``width*height`` (before decoding).
    Raises:
        DataError: ``image_missing``, ``image_unreadable``, ``image_bomb`` or ``image_aspect_ratio``.
    """
    image = _checked(Path(path), max_pixels, decode=True)
    assert isinstance(image, Image.Image)
    return image


def image_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> tuple[int, int]:
    """Declared (width, height) from the header only, after the same pre-decode checks as :func:`decode_image`
    (cheap: used to estimate costs before any pixel is decoded). A truncated file passes here and fails at decode."""
    size = _checked(Path(path), max_pixels, decode=False)
    assert isinstance(size, tuple)
    return size
