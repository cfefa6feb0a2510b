"""Decode one image file into a canonical 8-bit RGB picture, and fingerprint it.

Every image the project sees goes through :func:`decode_image` exactly once at ingest,
so that "what pixels does this item have" has one answer: EXIF orientation applied,
every PIL mode mapped to RGB by a documented rule, bombs and broken files refused with
a :class:`BadInputError` that names the item and says what to do.

Mode rules (why):
- ``RGBA``/``LA``/``PA``/``P`` with transparency are composited on **black**. Transparent
  areas carry no scene content, and black is already the "no content" value the model
  sees: the validator's rotation augmentation fills the corners with black. Compositing
  (instead of dropping alpha) also makes the result independent of whatever colour the
  encoder left under fully transparent pixels.
- ``I;16*`` (16-bit) is scaled with ``round(v * 255 / 65535)`` so 65535 -> 255 and the
  full range is kept; clipping would turn almost every 16-bit photo white.
  ``I`` (32-bit int, which PIL also uses for some 16-bit files) is scaled the same way when
  its values lie in 0..65535, and refused otherwise (no safe guess of its range).
- ``CMYK`` uses PIL's conversion (no ICC colour management), ``L``/``1``/``YCbCr``/``LAB``/
  ``HSV`` use ``Image.convert("RGB")``. ``F`` (float) and other exotic modes are refused.
- A broken EXIF block does not make an image unusable: orientation is then left as stored.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.fft import dct

from roadwork_assets.contracts.errors import BadInputError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "pixel_sha256", "perceptual_hash"]

DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; a 4032x3024 phone photo is 12 M

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_PLAIN_MODES = {"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_REMOVE_HINT = "re-export or re-download it, or remove it from the source"


def decode_image(
    source: bytes | Path | str, item: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode ``source`` (encoded bytes or a file path) into an RGB image.

    The declared width x height is checked against ``max_pixels`` after the header is
    read and before any pixel is decoded. Any failure raises :class:`BadInputError`
    naming ``item``. (PIL's own DecompressionBombWarning is silenced inside a
    ``warnings.catch_warnings`` block, which touches process-global state: call this from
    processes, not threads, when decoding in parallel.)
    """
    fp = _open_source(source, item)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the authority; PIL's softer warning
            # (at Image.MAX_IMAGE_PIXELS) must not leak out as noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise BadInputError(
                        f"image {item!r} declares {width}x{height} = {width * height:,} "
                        f"pixels, above the limit of {max_pixels:,}; refused before "
                        "decoding (decompression-bomb guard). If it is a genuine photo, "
                        "downscale it before ingest or raise max_pixels."
                    )
                im.load()  # decode now: truncation and corrupt data surface here
                im = _apply_exif_orientation(im)
                return _to_rgb(im, item)
    except BadInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInputError(
            f"image {item!r} was refused by PIL as a decompression bomb ({exc}). "
            "Downscale it before ingest, or raise PIL.Image.MAX_IMAGE_PIXELS together "
            "with max_pixels."
        ) from exc
    except UnidentifiedImageError as exc:
        raise BadInputError(
            f"image {item!r} cannot be identified as an image: unknown format or a "
            "corrupt header (is it another kind of file with an image extension?): "
            f"{_REMOVE_HINT}."
        ) from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        raise BadInputError(
            f"image {item!r} is corrupt or truncated and cannot be decoded "
            f"({type(exc).__name__}: {exc}): {_REMOVE_HINT}."
        ) from exc


def _open_source(source: bytes | Path | str, item: str) -> io.BytesIO | Path:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadInputError(f"image {item!r} has zero bytes: {_REMOVE_HINT}.")
        return io.BytesIO(source)
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise BadInputError(
            f"image {item!r}: file {str(path)!r} does not exist; check the source "
            "path (manifest paths are relative to the manifest's folder)."
        ) from exc
    except OSError as exc:
        raise BadInputError(f"image {item!r}: cannot read {str(path)!r} ({exc}).") from exc
    if not path.is_file():
        raise BadInputError(f"image {item!r}: {str(path)!r} is not a regular file.")
    if size == 0:
        raise BadInputError(f"image {item!r}: file {str(path)!r} is empty (0 bytes): {_REMOVE_HINT}.")
    return path


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a malformed picture
        return im


def _to_rgb(im: Image.Image, item: str) -> Image.Image:
    mode = im.mode
    if mode == "P":
        mode_after = "RGBA" if "transparency" in im.info else "RGB"
        im = im.convert(mode_after)
        mode = im.mode
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(im, item)
    if mode in _PLAIN_MODES:
        return im if mode == "RGB" else im.convert("RGB")
    raise BadInputError(
        f"image {item!r} has pixel mode {mode!r}, which has no safe 8-bit RGB meaning "
        "(e.g. floating-point data); convert it to an 8-bit RGB/grayscale image first."
    )


def _sixteen_bit_to_rgb(im: Image.Image, item: str) -> Image.Image:
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadInputError(
            f"image {item!r} is a 32-bit integer image with values outside 0..65535 "
            f"(min {values.min()}, max {values.max()}); its intended range is unknown: "
            "convert it to 8-bit (or 16-bit) RGB/grayscale first."
        )
    eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def pixel_sha256(img: Image.Image) -> str:
    """sha256 over mode, size and the raw decoded pixels.

    Identical pixels give identical hashes whatever the container (PNG vs BMP); any
    lossy re-encode (another JPEG quality) changes it. Near copies are
    :func:`perceptual_hash`'s job.
    """
    digest = hashlib.sha256()
    digest.update(f"{img.mode}|{img.width}x{img.height}|".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def perceptual_hash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash), as an unsigned int.

    Bit for bit ``int(str(imagehash.phash(img)), 16)`` (grayscale, 32x32 Lanczos, 2-D
    DCT-II, the 8x8 lowest frequencies compared with their median; bit 63 = the DC
    coefficient), written out so the bit order is explicit. Robust to resizing,
    re-compression and small crops; compare with Hamming distance.
    """
    gray = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    coeffs = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
