"""Decode one image file into a canonical 8-bit RGB picture, and fingerprint it.

Every image the project sees goes through :func:`decode_image` exactly once at ingest,
so that "what pixels does this item have" has one answer: EXIF orientation applied,
every PIL mode mapped to RGB by a documented rule, bombs and broken files refused with
a :class:`BadInputError` that names the item and says what to do.

Mode rules (why):
- ``RGBA``/``LA``/``PA``/``P`` with transparency are composited on **black**. Transparent
  areas carry no scene content, and black is already the "no content" value the model
  sees: the validator's rotation augmentation fills the corners with black (levels 1-3,
  docs/domain.md). Compositing (instead of dropping alpha) also makes the result
  independent of whatever colour the encoder left under fully transparent pixels.
- ``I;16*`` (16-bit) is scaled with ``round(v * 255 / 65535)`` so 65535 -> 255 and the
  full range is kept; clipping would turn almost every 16-bit photo white.
  ``I`` (32-bit int, which PIL also uses for some 16-bit files) is scaled the same way when
  its values lie in 0..65535, and refused otherwise (no safe guess of its range).
- ``CMYK`` uses PIL's conversion (no ICC colour management), ``L``/``1``/``YCbCr``/``LAB``/
  ``HSV`` use ``Image.convert("RGB")``. ``F`` (float) and other exotic modes are refused.
- A broken EXIF block does not make an image unusable: orientation is then left as stored.

Memory: two guards run on the header, before any pixel is decoded. ``max_pixels`` bounds
width x height; ``max_bytes`` bounds the memory the decode would hold at its peak, which
depends on the pixel mode, not only the pixel count (a 16-bit PNG of 900 KB declaring
9990x9990 used to cost 2 GB). :func:`decode_peak_bytes` is that estimate: PIL's storage
per pixel (1 byte for ``L``/``P``/``1``, 2 for ``I;16``, 4 for ``I``/``F`` and every
multi-band mode, RGB included), plus the buffers alive at once along the conversion path
(a progressive JPEG's coefficient buffer, the EXIF-rotated copy, the RGBA/black/composite
triple of alpha compositing, the 8-bit array of 16-bit scaling), plus one grey
copy made by the fingerprints. The conversion frees each intermediate as soon as the next
exists, so that estimate is an upper bound on the real peak
(``test_images.py::test_decode_peak_bytes_bounds_the_real_peak``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy.fft import dct

from roadwork_assets.contracts.errors import BadInputError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "decode_image",
    "decode_peak_bytes",
    "perceptual_hash",
    "pixel_sha256",
]

DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; a 4032x3024 phone photo is 12 M
# 256 MiB: a 4032x3024 JPEG peaks at 60 MB (98 MB when EXIF-rotated), a 24 MP one at
# 120 MB (192 MB rotated); a 48 MP JPEG stored sideways (384 MB) needs a higher limit.
DEFAULT_MAX_BYTES = 256 * 1024**2
_ORIENTATION = 0x0112
_ROW_BLOCK_BYTES = 8 * 1024**2  # 16-bit scaling and hashing work on row blocks this big
_FIXED_OVERHEAD_BYTES = 4 * _ROW_BLOCK_BYTES  # row-block temporaries, decoder buffers

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_PLAIN_MODES = {"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_REMOVE_HINT = "re-export or re-download it, or remove it from the source"


def decode_image(
    source: bytes | Path | str,
    item: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``source`` (encoded bytes or a file path) into an RGB image.

    ``draft_size``: a JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale (libjpeg's
    DCT scaling, PIL's ``Image.draft``) that still keeps both sides >= ``draft_size``;
    other formats, and JPEGs too small to shrink, decode at full size. For callers that
    resize to a fixed model input anyway: a 12 MP photo then costs a sixteenth of the
    decode time and memory. Fingerprints (ingest) must use the full decode.

    The declared width x height is checked against ``max_pixels``, and the memory the
    decode would hold at its peak (:func:`decode_peak_bytes`) against ``max_bytes``,
    after the header is read and before any pixel is decoded. Any failure raises
    :class:`BadInputError` naming ``item``. (PIL's own DecompressionBombWarning is
    silenced inside a ``warnings.catch_warnings`` block, which touches process-global
    state: call this from processes, not threads, when decoding in parallel.)
    """
    try:
        with _open_source(source, item) as stream, warnings.catch_warnings():
            # Our own limits below are the authority; PIL's softer warning
            # (at Image.MAX_IMAGE_PIXELS) must not leak out as noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # No `with` on the image: a context manager would keep the decoded original
            # alive until the end, next to every converted copy.
            im = Image.open(stream)
            width, height = im.size
            if width * height > max_pixels:
                raise BadInputError(
                    f"image {item!r} declares {width}x{height} = {width * height:,} "
                    f"pixels, above the limit of {max_pixels:,}; refused before "
                    "decoding (decompression-bomb guard). If it is a genuine photo, "
                    "downscale it before ingest or raise max_pixels."
                )
            _check_bytes(im, item, max_bytes, loaded=False)
            if draft_size and im.format == "JPEG":
                im.draft(None, (draft_size, draft_size))
            im.load()  # decode now: truncation and corrupt data surface here
            _check_bytes(im, item, max_bytes, loaded=True)  # a PNG's eXIf may follow the pixels
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


def _storage_bytes(mode: str) -> int:
    """Bytes PIL stores per pixel in ``mode`` (RGB is kept as 4 bytes, RGBX-style)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decode_peak_bytes(
    mode: str, width: int, height: int, *, rotated: bool = False, progressive_bands: int = 0
) -> int:
    """Upper bound on the bytes :func:`decode_image` (and fingerprinting) holds at once.

    ``mode`` is the PIL mode the decoder produces, ``rotated`` whether an EXIF
    orientation other than 1 will be applied, ``progressive_bands`` the band count of a
    progressive JPEG (its decoder keeps every DCT coefficient, 2 bytes per band per
    pixel at most), else 0. Per pixel, the largest of the stages:

    - decoding: the stored image (+ the coefficient buffer of a progressive JPEG);
    - EXIF rotation: the stored image and its rotated copy;
    - conversion to RGB: ``RGB`` nothing more; other plain modes the source + RGB (4);
      alpha and palette modes the RGBA copy, the black backdrop and the composite (12);
      16-bit the source and the 8-bit result (scaled a block of rows at a time), then
      the 8-bit grey + RGB (5);
    - the result (4) plus the grey copy the fingerprints make (1);

    plus a fixed 32 MiB for row-block temporaries and decoder buffers.
    """
    stored = _storage_bytes(mode)
    stages = [stored + 2 * progressive_bands, 4 + 1]
    if rotated:
        stages.append(2 * stored)
    if mode == "P" or mode in _ALPHA_MODES:
        stages.append(max(stored + 4, 12))
    elif mode.startswith("I;16") or mode == "I":
        stages.append(stored + 1)
    elif mode != "RGB":
        stages.append(stored + 4)
    return width * height * max(stages) + _FIXED_OVERHEAD_BYTES


def _check_bytes(im: Image.Image, item: str, max_bytes: int, *, loaded: bool) -> None:
    width, height = im.size
    rotated = _orientation(im, loaded) not in (None, 1)
    progressive = im.format == "JPEG" and bool(im.info.get("progressive") or im.info.get("progression"))
    bands = len(im.getbands()) if progressive else 0
    need = decode_peak_bytes(im.mode, width, height, rotated=rotated, progressive_bands=bands)
    if need > max_bytes:
        how = ", EXIF-rotated" if rotated else ""
        how += ", progressive JPEG" if progressive else ""
        raise BadInputError(
            f"image {item!r} is {width}x{height} in pixel mode {im.mode!r}{how}: decoding it "
            f"would take about {_mb(need)} of memory, above the limit of {_mb(max_bytes)}; "
            "refused before decoding (memory guard). If it is a genuine photo, downscale "
            "it (or convert it to 8-bit) before ingest, or raise max_bytes."
        )


def _mb(n: int) -> str:
    return f"{n / 1024**2:,.0f} MiB"


def _orientation(im: Image.Image, loaded: bool) -> int | None:
    """The EXIF orientation tag; before ``load`` only from what the header already holds
    (PIL's PNG ``getexif`` would decode every pixel to look for a trailing eXIf chunk)."""
    try:
        if loaded:
            return im.getexif().get(_ORIENTATION)
        if "exif" in im.info:
            exif = Image.Exif()
            exif.load(im.info["exif"])
            return exif.get(_ORIENTATION)
        return getattr(im, "tag_v2", {}).get(_ORIENTATION)  # TIFF keeps it as a tag
    except Exception:
        return None


@contextlib.contextmanager
def _open_source(source: bytes | Path | str, item: str) -> Iterator[io.BufferedIOBase]:
    """A readable stream for ``source``, closed on exit (PIL never owns it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadInputError(f"image {item!r} has zero bytes: {_REMOVE_HINT}.")
        yield io.BytesIO(source)
        return
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
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after PIL is done with it
    except OSError as exc:
        raise BadInputError(f"image {item!r}: cannot read {str(path)!r} ({exc}).") from exc
    with fh:
        yield fh


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        return _replace(im, ImageOps.exif_transpose(im))
    except Exception:
        return im


def _replace(old: Image.Image, new: Image.Image) -> Image.Image:
    """``new``, after freeing ``old``'s pixels (callers up the stack still hold ``old``)."""
    if new is not old:
        old.close()
    return new


def _to_rgb(im: Image.Image, item: str) -> Image.Image:
    # Each step frees its input as soon as its output exists (decode_peak_bytes counts
    # on it): `_replace` closes the input, which decode_image's frame still references.
    mode = im.mode
    if mode == "P":
        mode_after = "RGBA" if "transparency" in im.info else "RGB"
        im = _replace(im, im.convert(mode_after))
        mode = im.mode
    if mode in _ALPHA_MODES:
        if mode != "RGBA":
            im = _replace(im, im.convert("RGBA"))
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = _replace(im, Image.alpha_composite(black, im))
        black.close()
        return _replace(im, im.convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(im, item)
    if mode in _PLAIN_MODES:
        return im if mode == "RGB" else _replace(im, im.convert("RGB"))
    raise BadInputError(
        f"image {item!r} has pixel mode {mode!r}, which has no safe 8-bit RGB meaning "
        "(e.g. floating-point data); convert it to an 8-bit RGB/grayscale image first."
    )


def _row_blocks(im: Image.Image, bytes_per_pixel: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(top, rows)`` over blocks of about _ROW_BLOCK_BYTES; never a copy of the whole
    image (``np.asarray(im)`` would cost three: PIL joins ``tobytes`` chunks)."""
    width, height = im.size
    step = max(1, _ROW_BLOCK_BYTES // max(1, bytes_per_pixel * width))
    for top in range(0, height, step):
        with im.crop((0, top, width, min(height, top + step))) as block:
            yield top, np.asarray(block)


def _sixteen_bit_to_rgb(im: Image.Image, item: str) -> Image.Image:
    if im.mode == "I":
        low = min((int(rows.min()) for _, rows in _row_blocks(im, 4)), default=0)
        high = max((int(rows.max()) for _, rows in _row_blocks(im, 4)), default=0)
        if low < 0 or high > 65535:
            raise BadInputError(
                f"image {item!r} is a 32-bit integer image with values outside 0..65535 "
                f"(min {low}, max {high}); its intended range is unknown: "
                "convert it to 8-bit (or 16-bit) RGB/grayscale first."
            )
    # round(v * 255 / 65535), in uint32 (65535 * 255 + 32767 < 2**32)
    eight_bit = np.empty((im.height, im.width), dtype=np.uint8)
    for top, rows in _row_blocks(im, 4):
        wide = rows.astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        eight_bit[top : top + len(wide)] = wide
    im.close()  # free the 16-bit pixels before the RGB copy exists
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def pixel_sha256(img: Image.Image) -> str:
    """sha256 over mode, size and the raw decoded pixels.

    Identical pixels give identical hashes whatever the container (PNG vs BMP); any
    lossy re-encode (another JPEG quality) changes it. Near copies are
    :func:`perceptual_hash`'s job.
    """
    digest = hashlib.sha256()
    digest.update(f"{img.mode}|{img.width}x{img.height}|".encode())
    # by blocks of rows: the same byte stream as img.tobytes(), without a full copy
    rows = max(1, _ROW_BLOCK_BYTES // max(1, 4 * img.width))
    for top in range(0, img.height, rows):
        with img.crop((0, top, img.width, min(img.height, top + rows))) as block:
            digest.update(block.tobytes())
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
