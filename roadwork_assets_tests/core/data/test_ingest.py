"""ingest_images: broken images are quarantined, not fatal; conflicting truth is."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.sources import read_class_folders, read_natix_parquet
from roadwork_assets_tests.core.data.scenes import encode, save, scene


def test_one_corrupt_file_is_quarantined_and_the_rest_ingested(tmp_path):
    for k in range(5):
        save(scene(k), tmp_path / ("roadwork" if k % 2 else "none") / f"img{k}.jpg")
    (tmp_path / "none" / "broken.jpg").write_bytes(encode(scene(9), "JPEG")[:300])
    records = read_class_folders(tmp_path)

    ingested, quarantined = ingest_images(records)

    assert sorted(ingested["item_id"]) == sorted(f"{'roadwork' if k % 2 else 'none'}/img{k}.jpg" for k in range(5))
    assert quarantined["item_id"].tolist() == ["none/broken.jpg"]
    assert "truncated" in quarantined["reason"][0] and "'none/broken.jpg'" in quarantined["reason"][0]
    assert (ingested["width"] == 160).all() and (ingested["height"] == 120).all()
    assert ingested["phash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert ingested["pixel_sha256"].str.len().eq(64).all() and ingested["pixel_sha256"].is_unique
    assert list(ingested.columns[:4]) == ["item_id", "uri", "label", "group_id"]


def test_identical_pixels_with_conflicting_labels_name_both_items(tmp_path):
    img = scene(1)
    save(img, tmp_path / "roadwork" / "site.png")
    save(img, tmp_path / "none" / "site_copy.bmp")  # same pixels, other container, other label
    save(scene(2), tmp_path / "none" / "other.png")
    with pytest.raises(BadInputError, match=r"conflicting labels: '(none/site_copy\.bmp|roadwork/site\.png)' \(label \d\) vs '(roadwork/site\.png|none/site_copy\.bmp)'"):
        ingest_images(read_class_folders(tmp_path))


def test_same_pixels_same_label_are_kept(tmp_path):
    img = scene(1)
    save(img, tmp_path / "roadwork" / "a.png")
    save(img, tmp_path / "roadwork" / "a_again.bmp")
    ingested, _ = ingest_images(read_class_folders(tmp_path))
    assert ingested["pixel_sha256"].nunique() == 1 and len(ingested) == 2


def test_nothing_usable_is_insufficient_data(tmp_path):
    (tmp_path / "roadwork").mkdir()
    (tmp_path / "roadwork" / "a.jpg").write_bytes(b"")
    with pytest.raises(InsufficientDataError, match="none of the 1 images could be used"):
        ingest_images(read_class_folders(tmp_path))


def test_reader_quarantine_is_carried_into_the_quarantine_table(tmp_path):
    struct = pa.struct([("bytes", pa.binary())])
    table = pa.table({
        "image": pa.array([{"bytes": encode(scene(k), "JPEG")} for k in range(2)], type=struct),
        "label": [1, 1],
        "scene_description": ["barriers on the left", ""],
        "id": ["a", "b"],
    })
    pq.write_table(table, tmp_path / "t.parquet")
    ingested, quarantined = ingest_images(read_natix_parquet(tmp_path / "t.parquet", tmp_path / "store"))
    assert ingested["item_id"].tolist() == ["t.parquet#row0"]
    assert quarantined["item_id"].tolist() == ["t.parquet#row1"]
    assert "scene_description" in quarantined["reason"][0]
