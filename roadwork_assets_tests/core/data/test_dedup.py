"""Cross-split leakage: exact copies, near copies and shared groups are caught and named.

Evidence for DEFAULT_MAX_DISTANCE = 6 (pHash bits), measured with the helpers in
scenes.py (pHash distances come in even numbers):
- near copies (90 % resize, JPEG q50, 3 % of width/height cropped at the borders):
  real photos (scikit-learn china / flower) 4 and 2 bits; synthetic scenes <= 6 bits for
  94 % of 1000 seeds, <= 8 for 99 %. Cropping 3 % at *each* border is much harsher:
  real photos 8 / 6 bits, synthetic <= 6 for 73 %, <= 8 for 89 %.
- distinct synthetic street scenes: smallest distance 10 among the 200 used below;
  <= 6 bits for 38 of 12.5 M pairs among 5000 scenes (3e-6 per pair), <= 8 for 1e-5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError, LeakageError
from roadwork_assets.core.data.dedup import (
    DEFAULT_MAX_DISTANCE,
    check_split_leakage,
    find_exact_duplicates,
    find_near_duplicates,
    find_shared_groups,
    near_duplicate_pairs,
    phash_array,
)
from roadwork_assets.core.data.images import perceptual_hash
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.sources import read_manifest
from roadwork_assets_tests.core.data.scenes import near_copy, save, scene, street_photo

SPLITS = ["train", "val_select", "val_calib", "val_test"]


def _ingest(tmp_path, files: dict[str, tuple[Image.Image | None, str, str | None]]) -> pd.DataFrame:
    """Write images (None: already on disk), read them through a manifest, ingest, attach splits."""
    rows = []
    for name, (img, split, group) in files.items():
        if img is not None:
            save(img, tmp_path / name)
        rows.append({"path": name, "label": 0, "group_id": group or "", "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    ingested, quarantined = ingest_images(read_manifest(tmp_path / "manifest.csv"))
    assert quarantined.empty
    return ingested.assign(split=ingested["item_id"].map({r["path"]: r["split"] for r in rows}))


def test_injected_exact_near_and_group_leaks_are_caught_and_named(tmp_path):
    files = {f"scene{k:03d}.png": (scene(k), SPLITS[k % 4], None) for k in range(24)}
    photo = street_photo()
    files["street.png"] = (photo, "train", None)
    files["street_near.png"] = (near_copy(photo), "val_select", None)  # resized, q50, cropped
    save(scene(100), tmp_path / "work_zone.jpg", quality=90)
    save(Image.open(tmp_path / "work_zone.jpg"), tmp_path / "work_zone_copy.png")  # same pixels
    files["work_zone.jpg"] = (None, "train", None)
    files["work_zone_copy.png"] = (None, "val_test", None)
    files["seq9_a.png"] = (scene(200), "train", "seq_9")
    files["seq9_b.png"] = (scene(201), "val_calib", "seq_9")
    table = _ingest(tmp_path, files)

    report = check_split_leakage(table)

    assert not report.ok
    assert (report.n_exact_groups, report.n_near_pairs, report.n_shared_groups) == (1, 1, 1)
    assert set(report.exact["item_id"]) == {"work_zone.jpg", "work_zone_copy.png"}
    near = report.near.iloc[0]
    assert {near.item_id_a, near.item_id_b} == {"street.png", "street_near.png"}
    assert {near.split_a, near.split_b} == {"train", "val_select"}
    assert near.distance <= DEFAULT_MAX_DISTANCE
    assert set(report.shared_groups["item_id"]) == {"seq9_a.png", "seq9_b.png"}
    text = report.summary()
    for name in ("work_zone.jpg", "work_zone_copy.png", "street.png", "street_near.png", "seq9_a.png", "seq_9"):
        assert repr(name) in text
    with pytest.raises(LeakageError, match="street_near.png"):
        report.raise_if_leaking()


def test_two_hundred_distinct_scenes_pass(tmp_path):
    rng = np.random.default_rng(7)
    files = {f"s{k:03d}.png": (scene(k), SPLITS[rng.integers(0, 4)], None) for k in range(200)}
    table = _ingest(tmp_path, files)
    report = check_split_leakage(table)
    assert report.ok, report.summary()
    hashes = phash_array(table["phash"])
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[np.triu_indices(len(hashes), 1)]
    assert distances.min() > DEFAULT_MAX_DISTANCE  # margin measured: 10 bits
    report.raise_if_leaking()


def test_near_copies_of_synthetic_scenes_are_mostly_within_the_default_distance():
    distances = np.array([
        bin(perceptual_hash(img) ^ perceptual_hash(near_copy(img))).count("1")
        for img in (scene(k) for k in range(100))
    ])
    assert (distances <= DEFAULT_MAX_DISTANCE).mean() >= 0.9


def test_same_split_and_exact_pairs_are_not_near_duplicates():
    table = pd.DataFrame({
        "item_id": ["a", "b", "c", "d"],
        "split": ["train", "train", "val_test", "val_test"],
        "phash": ["0" * 16, "0" * 15 + "1", "f" * 16, "f" * 16],
        "pixel_sha256": ["x", "y", "z", "z"],
        "group_id": [None, None, None, None],
    })
    assert find_near_duplicates(table).empty  # a~b share a split; c=d is exact, same split
    table.loc[3, "split"] = "train"
    assert find_near_duplicates(table).empty  # c=d is an exact copy: reported only there
    assert sorted(find_exact_duplicates(table)["item_id"]) == ["c", "d"]
    assert find_shared_groups(table).empty


@pytest.mark.parametrize("max_distance", [0, 3, 6, 8, 10])
def test_near_duplicate_pairs_match_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    centres = rng.integers(0, 2**64, size=20, dtype=np.uint64)
    hashes = centres[rng.integers(0, 20, size=1500)]
    for _ in range(8):  # clusters of hashes a few bits apart
        flip = np.uint64(1) << rng.integers(0, 64, size=1500).astype(np.uint64)
        hashes = np.where(rng.random(1500) < 0.5, hashes ^ flip, hashes)
    codes = rng.integers(0, 4, size=1500)
    brute = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    want_i, want_j = np.nonzero(np.triu((brute <= max_distance) & (codes[:, None] != codes[None, :]), 1))

    i, j, distance = near_duplicate_pairs(hashes, max_distance, codes=codes)

    assert len(want_i) > 0
    np.testing.assert_array_equal(i, want_i)
    np.testing.assert_array_equal(j, want_j)
    np.testing.assert_array_equal(distance, brute[want_i, want_j])


def test_bad_phash_values_are_refused():
    with pytest.raises(BadInputError, match=r"not 16 hex characters, e.g. 'xyz'"):
        phash_array(pd.Series(["0" * 16, "xyz"]))
    assert phash_array(pd.Series(["ffffffffffffffff"]))[0] == np.uint64(2**64 - 1)
