"""The generator's output, pinned: a refactor of the synthetic package must not change it.

The set below (8 images, seed 6, 48 px) covers all four lightings, a roadwork scene and
three negatives (two hard). The pins were taken from the generator before it became a
package (commit 87408e5) and still matched after; the full default dataset (4,000 images)
was compared file by file at the same time.

Three levels, so that a failure says what changed:
- manifest.csv / dataset.json: plain text, no image library involved.
- frame pixels before JPEG encoding (`scene_frames`): the generator's own logic. These
  depend on NumPy's Generator streams and on Pillow's drawing / resampling, but not on
  libjpeg.
- the JPEG files' bytes: the above plus the encoder. A Pillow / libjpeg(-turbo) upgrade
  may change these bytes while the pixel pins still pass; that is an encoder change, not
  a generator change. Check the pixel test passes, then re-pin (and consider bumping
  GENERATOR_VERSION so cached datasets are rebuilt).

If a change to the scenes is intended, bump GENERATOR_VERSION and re-pin all three.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from roadwork_assets.core.data.synthetic import generate_default_dataset, scene_frames

N, SEED, SIZE = 8, 6, 48

TEXT_SHA256 = {
    "manifest.csv": "30df6273fac0ea47ba8b83ee2ad79497255ac8fa9d81f3793889476929f8d92d",
    "dataset.json": "9720cf312a4ba2bd10b941beec9874c0e78fda922f4d0802415c4cefb9df2ad2",
}

# scene index -> (scene_kind, lighting, JPEG qualities, sha256 over (RGB bytes, quality) per frame)
FRAME_PIXELS_SHA256 = {
    0: ("hard_person_orange", "rain", [85, 80], "9b1222e9421f294ef9ab7676f2e8afad4b93dbf38f10087b95bc78a42167d31a"),
    1: ("drums", "day", [84, 88], "7687878a56fa72c162928af2976cbd20011512b0057d51b07fe6ce7f09bccfa0"),
    2: ("plain", "night", [89, 81], "ca33657150f6dae151e9ec29c51474952c8efe8e5c58ada7d4749a2cdf0c8f96"),
    3: ("hard_autumn_trees", "dusk", [81, 84], "0aef3fa2342ce4908eb3d2987890ec3473d3b34aafad895acaee156c39b0fda7"),
}

# May change with a Pillow / libjpeg upgrade alone: see the module docstring.
JPEG_SHA256 = {
    "images/none/scene-000000_f0.jpg": "72d78865627ceac63e8d9e330b06b29dfac13867fca2c6ed5b773601ab5af923",
    "images/none/scene-000000_f1.jpg": "e103620a7f4a3531ce84b513e6e1fcf1e7bc945c5aaacc9e2ebaf68897f5b07c",
    "images/roadwork/scene-000001_f0.jpg": "fc7feb8b8d079fe8c2ea91e8197f971fda4ea771dbc2e1e2b8dfcb8a9e2636bb",
    "images/roadwork/scene-000001_f1.jpg": "f5c52e9b1def3f774e2e14b3e13a1352fcbd896c5d2430eb5bf734b8621f5baa",
    "images/none/scene-000002_f0.jpg": "f3418d7d359fc6e076a6ee618f2eb9cfbd9d3774823121cc9b2cdaefee0f0484",
    "images/none/scene-000002_f1.jpg": "94b02c3222e0e2cdd6cdb2685c18221d07c4227ee71c03a8308fe3194d94639b",
    "images/none/scene-000003_f0.jpg": "df42a7ec2e0d25b1586ec16fb0f5fc45cd0a05146d9bec3152043e98f9df1cdb",
    "images/none/scene-000003_f1.jpg": "ec7bfb8eec12f71fc570d629991022805be2382d7433146891f2607563f5aed2",
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pinned") / "ds"
    generate_default_dataset(out, n_images=N, seed=SEED, image_size=SIZE)
    return out


def test_manifest_and_summary_bytes_are_pinned(dataset: Path) -> None:
    assert {name: _sha256(dataset / name) for name in TEXT_SHA256} == TEXT_SHA256


def test_frame_pixels_before_encoding_are_pinned() -> None:
    got = {}
    for index in FRAME_PIXELS_SHA256:
        scene, frames = scene_frames(SEED, index, 0.5, SIZE, 2)
        h = hashlib.sha256()
        for frame, quality in frames:
            assert frame.mode == "RGB" and frame.size == (SIZE, SIZE)
            h.update(frame.tobytes())
            h.update(bytes([quality]))
        got[index] = (scene.kind, scene.lighting, [q for _, q in frames], h.hexdigest())
    assert got == FRAME_PIXELS_SHA256


def test_jpeg_bytes_are_pinned(dataset: Path) -> None:
    files = {str(p.relative_to(dataset)) for p in dataset.rglob("*.jpg")}
    assert files == set(JPEG_SHA256)
    assert {rel: _sha256(dataset / rel) for rel in JPEG_SHA256} == JPEG_SHA256
