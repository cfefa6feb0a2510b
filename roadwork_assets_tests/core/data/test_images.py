"""decode_image: every bad-input row refused with the item named; every mode to RGB."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import (
    decode_image,
    decode_peak_bytes,
    perceptual_hash,
    pixel_sha256,
)
from roadwork_assets_tests.core.data.scenes import encode, save, scene

RNG = np.random.default_rng(0)


def _jpeg_bytes() -> bytes:
    return encode(scene(1), "JPEG", quality=90)


def _png_header(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG whose IHDR declares width x height, with a tiny IDAT: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------- refused inputs


def test_corrupt_jpeg_bytes_are_refused_naming_the_item():
    data = bytearray(_jpeg_bytes())
    data[2:302] = RNG.integers(0, 256, 300, dtype=np.uint8).tobytes()  # header segments
    with pytest.raises(BadInputError, match=r"'cam7/0042\.jpg'.*remove it from the source"):
        decode_image(bytes(data), "cam7/0042.jpg")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "half.jpg"
    path.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2])
    with pytest.raises(BadInputError, match=r"'half\.jpg'.*truncated"):
        decode_image(path, "half.jpg")


def test_zero_byte_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match=r"'empty\.jpg'.*empty \(0 bytes\)"):
        decode_image(path, "empty.jpg")
    with pytest.raises(BadInputError, match="zero bytes"):
        decode_image(b"", "empty bytes")


def test_non_image_with_jpg_extension_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a photo\n" * 20)
    with pytest.raises(BadInputError, match=r"'notes\.jpg' cannot be identified as an image"):
        decode_image(path, "notes.jpg")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(BadInputError, match=r"'gone\.jpg'.*does not exist"):
        decode_image(tmp_path / "gone.jpg", "gone.jpg")


def test_decompression_bomb_is_refused_before_decoding(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    bomb = _png_header(50_000, 50_000)  # 2.5 G pixels = 7.5 GB of RGB if decoded
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(BadInputError, match=r"'bomb\.png'.*decompression"):
        decode_image(bomb, "bomb.png")
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loads == []  # refused from the header: the pixel decoder never ran
    assert elapsed < 1.0
    assert peak < 5_000_000


def test_bomb_below_pil_limit_is_refused_by_max_pixels():
    # 120 M pixels: above our 100 M default, below PIL's hard error (2 x 89 M).
    with pytest.raises(BadInputError, match=r"12000x10000 = 120,000,000 pixels, above the limit of 100,000,000"):
        decode_image(_png_header(12_000, 10_000), "big.png")  # PIL would only warn here
    with pytest.raises(BadInputError, match="above the limit of 5,000"):
        decode_image(encode(scene(2), "PNG"), "small.png", max_pixels=5_000)


def test_sixteen_bit_image_is_refused_by_its_memory_cost_before_decoding(monkeypatch):
    # the case: 9990x9990 16-bit grey, under max_pixels, ~2 GB RSS when decoded
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    tracemalloc.start()
    with pytest.raises(BadInputError, match=(
            r"^image 'big16\.png' is 9990x9990 in pixel mode 'I;16': decoding it would take about "
            r"508 MiB of memory, above the limit of 256 MiB; refused before decoding \(memory guard\)\. "
            r".*downscale it \(or convert it to 8-bit\) before ingest, or raise max_bytes\.$")):
        decode_image(_png_header(9990, 9990, bit_depth=16, colour_type=0), "big16.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert loads == [] and peak < 5_000_000


def test_memory_limit_counts_exif_rotation():
    rotate = Image.Exif()
    rotate[0x0112] = 6
    img = Image.new("RGB", (1000, 1000), (200, 90, 10))
    plain, rotated = encode(img, "JPEG"), encode(img, "JPEG", exif=rotate.tobytes())
    limit = decode_peak_bytes("RGB", 1000, 1000) + 1_000_000  # plain fits, rotated does not
    assert decode_image(plain, "plain.jpg", max_bytes=limit).size == (1000, 1000)
    with pytest.raises(BadInputError, match=r"'sideways\.jpg' is 1000x1000 in pixel mode 'RGB', EXIF-rotated: decoding it would take about 40 MiB"):
        decode_image(rotated, "sideways.jpg", max_bytes=limit)


_PEAK_CHILD = """
import json, re, sys
from pathlib import Path
from PIL import Image
from roadwork_assets.core.data.images import decode_image, decode_peak_bytes, perceptual_hash, pixel_sha256
from roadwork_assets.core.data.similarity import thumbnail
def high_water():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
path = Path(sys.argv[1])
with Image.open(path) as im:
    rotated = im.format == "JPEG" and im.getexif().get(0x0112, 1) != 1  # PNG getexif decodes
    bands = len(im.getbands()) if im.info.get("progressive") else 0
    estimate = decode_peak_bytes(im.mode, *im.size, rotated=rotated, progressive_bands=bands)
before = high_water()
img = decode_image(path, path.name, max_bytes=estimate)
pixel_sha256(img), perceptual_hash(img), thumbnail(img)
after = high_water()
print(json.dumps({"estimate": estimate, "peak": after - before, "pixels": img.width * img.height}))
"""


def _peak_cases(tmp_path):
    w, h = 2400, 2000
    ramp = (np.arange(w * h, dtype=np.uint32) % 65536).reshape(h, w)
    rotate = Image.Exif()
    rotate[0x0112] = 8
    rgb = Image.fromarray(np.stack([ramp % 251, ramp % 241, ramp % 239], -1).astype(np.uint8))
    cases = {
        "i16.png": (Image.fromarray(ramp.astype(np.uint16)), {}),
        "rgba.png": (Image.fromarray(np.stack([ramp % 251] * 3 + [ramp % 256], -1).astype(np.uint8)), {}),
        "palette.png": (rgb.quantize(64), {"transparency": 3}),
        "rotated_progressive.jpg": (rgb, {"exif": rotate.tobytes(), "progressive": True, "quality": 80}),
    }
    for name, (img, options) in cases.items():
        img.save(tmp_path / name, **options)
    return list(cases)


def test_decode_peak_bytes_bounds_the_real_peak(tmp_path):
    """Measured in a fresh process: peak RSS growth while decoding and fingerprinting
    stays within decode_peak_bytes, for the modes with the costliest conversions."""
    for name in _peak_cases(tmp_path):
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / name)],
                             capture_output=True, text=True, timeout=120, check=True)
        got = json.loads(out.stdout)
        assert got["peak"] <= got["estimate"], (name, got)
        assert got["peak"] >= 4 * got["pixels"] * 0.9, (name, got)  # it measured the RGB result


def test_predict_applies_the_same_memory_limit(tmp_path):
    from types import SimpleNamespace

    from roadwork_assets.core.export.predictor import BundlePredictor

    predictor = object.__new__(BundlePredictor)  # decoding comes before the model is used
    predictor.bundle = SimpleNamespace(manifest=SimpleNamespace(img_size=32))
    path = tmp_path / "big16.png"
    path.write_bytes(_png_header(9990, 9990, bit_depth=16, colour_type=0))
    with pytest.raises(BadInputError, match=r"big16\.png' is 9990x9990 in pixel mode 'I;16'.*above the limit of 256 MiB"):
        predictor.predict_paths([path])


def test_float_mode_image_is_refused():
    data = encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF")
    with pytest.raises(BadInputError, match=r"'depth\.tif' has pixel mode 'F'"):
        decode_image(data, "depth.tif")


# ---------------------------------------------------------------- modes -> RGB


def test_grayscale_becomes_grey_rgb():
    img = decode_image(encode(Image.new("L", (5, 4), 77), "PNG"), "gray.png")
    assert img.mode == "RGB" and img.size == (5, 4)
    assert img.getpixel((2, 2)) == (77, 77, 77)


def test_rgba_is_composited_on_black():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (200, 100, 50, 128), (10, 20, 30, 255)])
    img = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert img.getpixel((0, 0)) == (0, 0, 0)  # transparent -> black, whatever colour was under it
    assert all(abs(a - b) <= 1 for a, b in zip(img.getpixel((1, 0)), (100, 50, 25)))
    assert img.getpixel((2, 0)) == (10, 20, 30)


def test_palette_with_transparency_is_composited_on_black():
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    pal.putdata([0, 1])
    data = encode(pal, "PNG", transparency=0)
    img = decode_image(data, "palette.png")
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((1, 0)) == (255, 0, 0)
    assert decode_image(encode(pal, "PNG"), "opaque.png").getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 255, 255, 0)])
    img = decode_image(encode(cmyk, "TIFF"), "print.tif")
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (255, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = decode_image(encode(Image.fromarray(values), "PNG"), "depth16.png")
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    img = decode_image(encode(stored, "JPEG", quality=95, exif=exif), "portrait.jpg")
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


# --------------------------------------------------------------------- fingerprints


def test_pixel_sha256_ignores_container_but_not_lossy_reencoding(tmp_path):
    img = scene(3)
    png = decode_image(save(img, tmp_path / "a.png"), "a.png")
    bmp = decode_image(save(img, tmp_path / "a.bmp"), "a.bmp")
    assert pixel_sha256(png) == pixel_sha256(bmp)
    q90 = decode_image(encode(img, "JPEG", quality=90), "q90")
    q50 = decode_image(encode(img, "JPEG", quality=50), "q50")
    assert pixel_sha256(q90) != pixel_sha256(q50)


def test_perceptual_hash_matches_imagehash_and_survives_resizing():
    imagehash = pytest.importorskip("imagehash")
    img = scene(4)
    assert perceptual_hash(img) == int(str(imagehash.phash(img)), 16)
    resized = img.resize((120, 90), Image.Resampling.BICUBIC)
    assert (perceptual_hash(img) ^ perceptual_hash(resized)).bit_count() <= 2
    assert 0 <= perceptual_hash(img) < 2**64
