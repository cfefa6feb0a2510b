"""Source readers: class folders, manifests, NATIX parquet, labels, dispatch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.sources import (
    load_source,
    parse_labels,
    read_class_folders,
    read_manifest,
    read_natix_parquet,
    source_quarantine,
)
from roadwork_assets_tests.core.data.scenes import encode, save, scene

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _class_tree(root: Path) -> Path:
    save(scene(1), root / "roadwork" / "a.jpg")
    save(scene(2), root / "roadwork" / "seq_01" / "b.JPG", format="JPEG")
    save(scene(3), root / "none" / "seq_01" / "c.png")
    save(scene(4), root / "none" / "d.webp")
    (root / "none" / "notes.txt").write_text("not an image")
    (root / "none" / ".hidden.jpg").write_bytes(b"")
    return root


def _natix_table(rows: list[dict], image_column: str = "image") -> pa.Table:
    return pa.table({
        image_column: pa.array([r.get("image") for r in rows], type=IMAGE_STRUCT),
        "label": pa.array([r["label"] for r in rows], type=pa.int64()),
        "scene_description": pa.array([r.get("desc") for r in rows], type=pa.string()),
        "id": pa.array([f"natix-{i}" for i in range(len(rows))]),
        "width": pa.array([160] * len(rows), type=pa.int32()),
        "height": pa.array([120] * len(rows), type=pa.int32()),
    })


# ------------------------------------------------------------------- class folders


def test_class_folders_labels_groups_and_filters(tmp_path):
    records = read_class_folders(_class_tree(tmp_path / "data"))
    by_id = records.set_index("item_id")
    assert sorted(by_id.index) == ["none/d.webp", "none/seq_01/c.png", "roadwork/a.jpg", "roadwork/seq_01/b.JPG"]
    assert by_id.loc["roadwork/a.jpg", "label"] == 1 and by_id.loc["none/d.webp", "label"] == 0
    assert records["label"].dtype == np.int8
    # a subfolder is a group, shared across both classes
    assert by_id.loc["roadwork/seq_01/b.JPG", "group_id"] == by_id.loc["none/seq_01/c.png", "group_id"] == "seq_01"
    assert by_id.loc["roadwork/a.jpg", "group_id"] is None
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in records["uri"])


def test_class_folders_missing_both_folders_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(BadInputError, match=r"images'.*neither a roadwork/ nor a none/.*roadwork/\*\.jpg"):
        read_class_folders(tmp_path / "images")


# -------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (0, 0), (np.int64(1), 1), (1.0, 1), ("1", 1), ("0", 0), ("1.0", 1), (" 0.0 ", 0),
     (True, 1), (np.bool_(False), 0), ("True", 1), ("false", 0)],
)
def test_label_accepted(value, expected):
    assert parse_labels([value], ["item"]).tolist() == [expected]


@pytest.mark.parametrize(
    "value", ["yes", "roadwork", "none", 2, -1, 0.5, "2", float("nan"), None, pd.NA, ""],
    ids=["yes", "roadwork", "none", "2", "-1", "0.5", "'2'", "NaN", "None", "NA", "empty"],
)
def test_label_refused_names_item_and_value(value):
    with pytest.raises(BadInputError, match=r"1 label\(s\) in the source are not 0/1: 'cam3/17\.jpg'.*never guessed"):
        parse_labels([1, value], ["cam3/16.jpg", "cam3/17.jpg"])


def test_label_refusal_lists_at_most_ten_items():
    with pytest.raises(BadInputError, match=r"25 label\(s\).*'i9': 'yes' \(and 15 more\)"):
        parse_labels(["yes"] * 25, [f"i{k}" for k in range(25)])


# ------------------------------------------------------------------------ manifest


def test_manifest_csv_resolves_paths_parses_labels_and_groups(tmp_path):
    save(scene(1), tmp_path / "imgs" / "a.jpg")
    save(scene(2), tmp_path / "imgs" / "b.jpg")
    absolute = save(scene(3), tmp_path / "elsewhere" / "c.jpg")
    manifest = tmp_path / "meta" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text(f"path,label,scene_id\n../imgs/a.jpg,1.0,s1\n./../imgs/b.jpg,0,\n{absolute},1,s1\n")
    records = read_manifest(manifest)
    assert records["label"].tolist() == [1, 0, 1]
    assert records["group_id"].tolist() == ["s1", None, "s1"]
    assert records["uri"].tolist() == [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "b.jpg"), str(absolute)]
    assert records["item_id"].tolist()[:2] == ["../imgs/a.jpg", "../imgs/b.jpg"]


def test_manifest_missing_column_names_column_file_and_present_columns(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,class\na.jpg,1\n")
    with pytest.raises(BadInputError, match=r"m\.csv' lacks column\(s\) 'label'; columns present: 'path', 'class'"):
        read_manifest(manifest)


def test_manifest_bad_label_names_item(tmp_path):
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["1", "yes"]}).to_parquet(manifest)
    with pytest.raises(BadInputError, match=r"'b\.jpg': 'yes'"):
        read_manifest(manifest)


def test_duplicate_item_ids_are_refused(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,1\nb.jpg,0\n./a.jpg,1\n")
    with pytest.raises(BadInputError, match=r"1 item id\(s\) occur more than once.*'a\.jpg'"):
        read_manifest(manifest)


# --------------------------------------------------------------------------- NATIX


def test_natix_round_trip_extracts_images_and_quarantines_undescribed_roadwork(tmp_path):
    images = [encode(scene(k), "JPEG", quality=85) for k in range(4)]
    rows = [
        {"image": {"bytes": images[0], "path": None}, "label": 0, "desc": None},
        {"image": {"bytes": images[1], "path": "x.jpg"}, "label": 1, "desc": "cones closing the right lane"},
        {"image": {"bytes": images[2], "path": None}, "label": 1, "desc": "  "},
        {"image": {"bytes": images[3], "path": None}, "label": 1, "desc": None},
        {"image": {"bytes": b"", "path": None}, "label": 0, "desc": None},
    ]
    parquet = tmp_path / "natix" / "train-00000.parquet"
    parquet.parent.mkdir()
    pq.write_table(_natix_table(rows), parquet)
    store = tmp_path / "store"

    records = read_natix_parquet(parquet, store)
    assert records["item_id"].tolist() == ["train-00000.parquet#row0", "train-00000.parquet#row1"]
    assert records["label"].tolist() == [0, 1]
    for uri, data in zip(records["uri"], images[:2]):
        digest = hashlib.sha256(data).hexdigest()
        assert Path(uri) == store / digest[:2] / f"{digest}.jpg"
        assert Path(uri).read_bytes() == data
    quarantined = source_quarantine(records).set_index("item_id")["reason"]
    assert sorted(quarantined.index) == [f"train-00000.parquet#row{k}" for k in (2, 3, 4)]
    assert "empty scene_description" in quarantined["train-00000.parquet#row2"]
    assert "no image bytes" in quarantined["train-00000.parquet#row4"]
    assert not list(store.rglob(".tmp-*"))  # atomic writes leave no temp files

    mtime = Path(records["uri"][0]).stat().st_mtime_ns
    again = load_source(str(parquet.parent), tmp_path / "cache")  # folder of parquet files
    assert again["label"].tolist() == [0, 1]
    assert read_natix_parquet(parquet, store)["uri"].tolist() == records["uri"].tolist()
    assert Path(records["uri"][0]).stat().st_mtime_ns == mtime  # existing files are reused


def test_natix_missing_columns_are_named_with_present_columns(tmp_path):
    table = _natix_table([{"image": {"bytes": b"x", "path": None}, "label": 0}]).drop_columns(["scene_description"])
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"lacks column\(s\) 'scene_description'; columns present: 'image' \(struct<bytes"):
        read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")


def test_natix_without_a_bytes_struct_column_is_refused(tmp_path):
    table = _natix_table([{"image": {"bytes": b"x", "path": None}, "label": 0}]).drop_columns(["image"])
    pq.write_table(table.append_column("picture", pa.array(["a.jpg"])), tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"lacks column\(s\) an image column \(a struct column with a 'bytes' field\); columns present: 'label'"):
        read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")


def test_natix_image_column_is_the_first_struct_holding_bytes(tmp_path):
    data = encode(scene(1), "PNG")
    rows = [{"image": {"bytes": data, "path": None}, "label": 0}]
    # a string `image_id` before the struct `image` column: the struct is the image column
    table = _natix_table(rows)
    table = table.add_column(0, "image_id", pa.array(["photo-1"]))
    pq.write_table(table, tmp_path / "a.parquet")
    records = read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")
    assert Path(records["uri"][0]).read_bytes() == data
    # any name works when it is the only struct with bytes; "image" wins among several
    (tmp_path / "b").mkdir()
    pq.write_table(_natix_table(rows, image_column="picture"), tmp_path / "b" / "b.parquet")
    assert Path(load_source(tmp_path / "b", tmp_path / "cache")["uri"][0]).read_bytes() == data
    decoy = pa.array([{"bytes": b"not this one", "path": None}], type=IMAGE_STRUCT)
    pq.write_table(_natix_table(rows).add_column(0, "thumb", decoy), tmp_path / "c.parquet")
    assert Path(read_natix_parquet(tmp_path / "c.parquet", tmp_path / "store")["uri"][0]).read_bytes() == data


def test_natix_repeated_id_is_refused_naming_the_id_and_rows(tmp_path):
    rows = [{"image": {"bytes": b"x", "path": None}, "label": k % 2, "desc": "cones"} for k in range(800)]
    table = _natix_table(rows).set_column(3, "id", pa.array(["same"] * 800))
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"1 NATIX id\(s\) occur in more than one row of .*: 'same' \(800 rows: a\.parquet#row0, a\.parquet#row1, a\.parquet#row2 and 797 more\)\. Every photo must be listed once"):
        read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")
    assert not (tmp_path / "store").exists()  # refused before any image is extracted
    # across files of one folder too
    folder = tmp_path / "natix"
    folder.mkdir()
    pq.write_table(_natix_table(rows[:2]), folder / "train-0.parquet")
    pq.write_table(_natix_table(rows[:1]), folder / "train-1.parquet")
    with pytest.raises(BadInputError, match=r"'natix-0' \(2 rows: train-0\.parquet#row0, train-1\.parquet#row0\)"):
        read_natix_parquet(folder, tmp_path / "store")


def test_natix_image_column_without_bytes_is_refused(tmp_path):
    table = _natix_table([{"label": 0}]).set_column(0, "image", pa.array(["a.jpg"]))
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"image column 'image' has type string, expected a struct"):
        read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")


def test_natix_bad_label_is_refused_before_extracting(tmp_path):
    rows = [{"image": {"bytes": encode(scene(1), "PNG"), "path": None}, "label": 2, "desc": "x"}]
    pq.write_table(_natix_table(rows), tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"'a\.parquet#row0': 2"):
        read_natix_parquet(tmp_path / "a.parquet", tmp_path / "store")
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------ dispatch


def test_load_source_dispatches_each_layout(tmp_path):
    assert len(load_source(str(_class_tree(tmp_path / "folders")), tmp_path / "cache")) == 4
    save(scene(1), tmp_path / "m" / "a.jpg")
    (tmp_path / "m" / "list.csv").write_text("path,label\na.jpg,1\n")
    assert load_source(str(tmp_path / "m" / "list.csv"), tmp_path / "cache")["label"].tolist() == [1]
    pd.DataFrame({"path": ["a.jpg"], "label": [0], "sequence_id": [7]}).to_parquet(tmp_path / "m" / "list.parquet")
    manifest = load_source(tmp_path / "m" / "list.parquet", tmp_path / "cache")
    assert manifest["group_id"].tolist() == ["7"]
    rows = [{"image": {"bytes": encode(scene(1), "PNG"), "path": None}, "label": 0}]
    pq.write_table(_natix_table(rows), tmp_path / "n.parquet")
    natix = load_source(tmp_path / "n.parquet", tmp_path / "cache")
    assert Path(natix["uri"][0]).is_relative_to(tmp_path / "cache" / "natix_images")
    assert natix["uri"][0].endswith(".png")


def test_load_source_unknown_layout_explains_accepted_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("hi")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "t.parquet")
    for spec in (tmp_path / "empty", tmp_path / "x.txt", tmp_path / "t.parquet", tmp_path / "nope"):
        with pytest.raises(BadInputError, match=r"Accepted sources: \(1\) a folder"):
            load_source(str(spec), tmp_path / "cache")
    with pytest.raises(ValueError, match="no source given"):
        load_source(None, tmp_path / "cache")


# ---------------------------------------------------------------- hidden files


def test_hidden_files_are_skipped_in_folder_scans_but_read_when_listed(tmp_path):
    # class folders: hidden files and anything under a hidden folder
    root = _class_tree(tmp_path / "folders")
    save(scene(5), root / "roadwork" / ".thumbs" / "a.jpg")
    assert sorted(read_class_folders(root)["item_id"]) == [
        "none/d.webp", "none/seq_01/c.png", "roadwork/a.jpg", "roadwork/seq_01/b.JPG"]
    # NATIX folder: a partial download and a hidden folder of junk do not fail the run
    natix = tmp_path / "natix"
    (natix / ".cache").mkdir(parents=True)
    rows = [{"image": {"bytes": encode(scene(1), "PNG"), "path": None}, "label": 0}]
    pq.write_table(_natix_table(rows), natix / "train-0.parquet")
    (natix / ".part-1.parquet").write_bytes(b"PAR1 half a download")
    (natix / ".cache" / "x.parquet").write_bytes(b"junk")
    for records in (read_natix_parquet(natix, tmp_path / "store"), load_source(natix, tmp_path / "cache")):
        assert records["item_id"].tolist() == ["train-0.parquet#row0"]
    # only hidden parquet files: nothing to read, and the message says hidden ones were skipped
    (natix / "train-0.parquet").unlink()
    with pytest.raises(BadInputError, match=r"holds no \.parquet files \(hidden ones skipped\)"):
        read_natix_parquet(natix, tmp_path / "store")
    # a manifest's explicit paths are the user's choice: a listed hidden file is read
    save(scene(6), tmp_path / "m" / ".hidden.jpg")
    (tmp_path / "m" / "list.csv").write_text("path,label\n.hidden.jpg,1\n")
    assert read_manifest(tmp_path / "m" / "list.csv")["item_id"].tolist() == [".hidden.jpg"]


# ------------------------------------------------------------- large and empty


def test_manifest_repeating_one_path_is_refused_before_per_row_work(tmp_path, monkeypatch):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "a.jpg,1\n" * 500_000 + "b.jpg,0\n" * 2)
    calls = []
    monkeypatch.setattr("roadwork_assets.core.data.sources.parse_labels", lambda *a, **k: calls.append(1))
    with pytest.raises(BadInputError, match=r"2 item id\(s\) occur more than once in manifest .*m\.csv': 'a\.jpg' \(rows 0, 1, 2 and 499997 more\); 'b\.jpg' \(rows 500000, 500001\)\. Every item must be listed once"):
        read_manifest(manifest)
    assert calls == []  # refused from the whole column, before labels are parsed row by row


def test_header_only_manifest_says_it_lists_no_images(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n")
    with pytest.raises(BadInputError, match=r"m\.csv' lists no images \(it has columns but no rows\): add one row per image"):
        load_source(manifest, tmp_path / "cache")


def test_manifest_empty_paths_are_counted_and_listed(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,1\n,0\n")
    with pytest.raises(BadInputError, match=r"has 1 empty 'path' value\(s\), at row 1: fill them in"):
        read_manifest(manifest)


def test_empty_class_folders_say_no_images_were_found(tmp_path):
    (tmp_path / "roadwork").mkdir()
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(BadInputError, match=r"^no images \(extensions .*hidden files skipped\) found under .*roadwork, .*none: put the images there\.$"):
        read_class_folders(tmp_path)


def test_empty_natix_parquet_says_it_holds_no_rows(tmp_path):
    pq.write_table(_natix_table([]), tmp_path / "a.parquet")
    with pytest.raises(BadInputError, match=r"a\.parquet' holds no rows \(1 parquet file\(s\), all empty\): point it at"):
        load_source(tmp_path / "a.parquet", tmp_path / "cache")
    rows = [{"image": {"bytes": b"", "path": None}, "label": 0}]
    pq.write_table(_natix_table(rows), tmp_path / "b.parquet")
    with pytest.raises(BadInputError, match=r"yielded no usable rows: its only row was set aside \(e\.g\. b\.parquet#row0: no image bytes"):
        read_natix_parquet(tmp_path / "b.parquet", tmp_path / "store")
    pq.write_table(_natix_table(rows * 3), tmp_path / "c.parquet")
    with pytest.raises(BadInputError, match=r"all 3 rows were set aside"):
        read_natix_parquet(tmp_path / "c.parquet", tmp_path / "store")
