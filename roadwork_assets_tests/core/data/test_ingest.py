"""ingest_images: broken images are quarantined, not fatal; conflicting truth is."""

from __future__ import annotations

import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.sources import (
    RECORD_COLUMNS,
    read_class_folders,
    read_natix_parquet,
)
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
    with pytest.raises(InsufficientDataError, match=r"the only image could not be used \(all quarantined\), e\.g\.: image 'roadwork/a\.jpg'"):
        ingest_images(read_class_folders(tmp_path))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "b.jpg").write_bytes(b"")
    with pytest.raises(InsufficientDataError, match="none of the 2 images could be used"):
        ingest_images(read_class_folders(tmp_path))


def test_no_records_say_there_is_nothing_to_ingest():
    empty = pd.DataFrame({c: [] for c in RECORD_COLUMNS})
    with pytest.raises(InsufficientDataError, match=r"^the source lists no images, so there is nothing to ingest"):
        ingest_images(empty)


def test_an_image_over_the_memory_limit_is_quarantined(tmp_path):
    save(scene(1), tmp_path / "none" / "small.png")
    big = Image.new("I;16", (1200, 1000), 4000)  # 16-bit grey: ~5 bytes per pixel decoded
    (tmp_path / "roadwork").mkdir()
    big.save(tmp_path / "roadwork" / "big.png")
    limit = 32 * 1024**2 + 3_000_000  # fixed overhead + 3 MB: room for small, not big
    ingested, quarantined = ingest_images(read_class_folders(tmp_path), max_bytes=limit)
    assert ingested["item_id"].tolist() == ["none/small.png"]
    assert quarantined["item_id"].tolist() == ["roadwork/big.png"]
    assert re.search(r"'roadwork/big\.png' is 1200x1000 in pixel mode 'I;16': decoding it would take about \d+ MiB", quarantined["reason"][0])


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
