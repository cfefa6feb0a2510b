"""Several sources at once (ROADWORK_DATA a:b): parsing, reading two layouts together,
item-id collisions, a missing source, copies across sources, a held-out source, and
per-source training weights. Real files from the awkward generator."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.balance import SourceBalance, source_sample_weights
from roadwork_assets.core.data.dedup import check_split_leakage
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.multi_source import (
    SourceSpec,
    load_sources,
    parse_source_specs,
)
from roadwork_assets.core.data.similarity import NearDuplicateRule
from roadwork_assets.core.data.splits import split_images, split_shape_report
from roadwork_assets_tests.awkward_data import (
    generate_awkward,
    write_class_folders,
    write_manifest_csv,
    write_natix_parquet,
)

SEP = os.pathsep
FRACTIONS = {"train": 0.55, "val_select": 0.10, "val_calib": 0.25, "val_test": 0.10}


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory):
    """Source a: class folders (40 images); b: a CSV manifest with group ids (30);
    c: NATIX parquet (20); all distinct pictures (different seeds)."""
    root = tmp_path_factory.mktemp("multi")
    a = write_class_folders(generate_awkward(40, seed=1, image_size=64), root / "a")
    b = write_manifest_csv(generate_awkward(30, seed=2, image_size=64), root / "b",
                           with_groups=True)
    c = write_natix_parquet(generate_awkward(20, seed=3, image_size=64), root / "c.parquet")
    return root, a, b, c


def test_parse_source_specs_names_order_and_refusals(tmp_path):
    assert parse_source_specs(None) == []
    assert parse_source_specs("/d/photos") == [SourceSpec("photos", "/d/photos")]
    assert parse_source_specs(f"/d/city/manifest.csv{SEP}natix=/x/y.parquet{SEP}") == [
        SourceSpec("manifest", "/d/city/manifest.csv"), SourceSpec("natix", "/x/y.parquet")]
    # a folder whose own name holds "=" is a path, not name=path
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_source_specs(str(odd)) == [SourceSpec("a_b", str(odd))]
    with pytest.raises(BadInputError, match=r"'images' is the name of more than one .* "
                                            r"name=path, e\.g\. a=/x/images"):
        parse_source_specs(f"/x/images{SEP}/y/images")


def test_two_layouts_ingest_together_with_their_source(two_layouts, tmp_path):
    _, a, b, c = two_layouts
    records = load_sources(f"{a}{SEP}city={b}{SEP}{c}", tmp_path / "cache")
    counts = records["source"].value_counts().to_dict()
    # NATIX quarantines none here: every positive has a description
    assert counts == {"a": 40, "city": 30, "c": 20}
    assert records["item_id"].is_unique
    # a later source's group ids are namespaced by source; class folders have none
    city = records[records["source"] == "city"]
    assert city["group_id"].str.startswith("city/").all()
    assert records.loc[records["source"] == "a", "group_id"].isna().all()
    ingested, quarantined = ingest_images(records)
    assert len(ingested) == 90 and len(quarantined) == 0
    assert ingested.groupby("source").size().to_dict() == counts  # kept through ingest


def test_one_source_reads_as_before_plus_its_name(two_layouts, tmp_path):
    _, a, b, _ = two_layouts
    records = load_sources(str(b), tmp_path / "cache")
    assert set(records["source"]) == {"manifest"}
    # group ids untouched with a single source (existing splits keep their keys) ...
    assert not records["group_id"].str.startswith("manifest/").any()
    # ... and when a second source is added after it: the previous split is reused
    ingested = ingest_images(records)[0]
    first = split_images(ingested, FRACTIONS, seed=0).assignment
    both = ingest_images(load_sources(f"{b}{SEP}{a}", tmp_path / "cache"))[0]
    result = split_images(both, FRACTIONS, seed=0, previous=first)
    assert result.previous_note is None and result.n_kept_from_previous == len(first)
    again = result.assignment.set_index("item_id")["split"]
    assert (again.reindex(first["item_id"]).to_numpy() == first["split"].to_numpy()).all()


def test_colliding_item_ids_are_prefixed_with_the_source(tmp_path):
    one = write_class_folders(generate_awkward(12, seed=5, image_size=48), tmp_path / "one")
    # source two: other pictures under six of the same relative paths
    rng = np.random.default_rng(0)
    for path in sorted(p for p in one.rglob("*") if p.is_file())[:6]:
        target = tmp_path / "two" / path.relative_to(one)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(target)
    records = load_sources(f"{tmp_path / 'one'}{SEP}{tmp_path / 'two'}", tmp_path / "cache")
    assert records["item_id"].is_unique and len(records) == 18
    two = records[records["source"] == "two"]["item_id"]
    assert two.str.startswith("two:").all()
    # the first source keeps its ids as written (adding a source renames nothing there)
    assert not records[records["source"] == "one"]["item_id"].str.contains(":").any()


def test_missing_second_source_is_named(two_layouts, tmp_path):
    _, a, _, _ = two_layouts
    with pytest.raises(BadInputError, match=r"source 'nowhere' \(entry 2 of 2 in "
                                            r"ROADWORK_DATA\) does not exist: .*nowhere"):
        load_sources(f"{a}{SEP}{tmp_path / 'nowhere'}", tmp_path / "cache")


def _copy_of(path, size: int) -> bytes:
    """A resized, re-encoded copy (JPEG q80) of the image at ``path``."""
    img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _with_copies(tmp_path, n_copies=4):
    """Source a: class folders; source b: a manifest of other photos plus resized,
    re-encoded copies of a's first ``n_copies`` images."""
    a = write_class_folders(generate_awkward(60, seed=11, image_size=96), tmp_path / "a")
    b_root = tmp_path / "b"
    manifest = write_manifest_csv(generate_awkward(40, seed=12, image_size=96), b_root)
    originals = sorted((a / "roadwork").glob("*.jpg"))[:n_copies]
    rows = []
    for k, original in enumerate(originals):
        (b_root / "images" / f"copy_{k}.jpg").write_bytes(_copy_of(original, 80))
        rows.append(f"images/copy_{k}.jpg,1\n")
    # and one lossless copy (same decoded pixels, another container)
    Image.open(originals[0]).save(b_root / "images" / "exact_0.png")
    rows.append("images/exact_0.png,1\n")
    with open(manifest, "a") as fh:
        fh.writelines(rows)
    return a, manifest, originals


def test_copy_in_two_sources_lands_in_one_group_and_split(tmp_path):
    a, b, originals = _with_copies(tmp_path)
    records = load_sources(f"{a}{SEP}{b}", tmp_path / "cache")
    ingested, _ = ingest_images(records)
    rule = NearDuplicateRule()
    result = split_images(ingested, FRACTIONS, seed=0, rule=rule)
    out = result.assignment.set_index("item_id")
    for k, original in enumerate(originals):
        copy = out.loc[f"images/copy_{k}.jpg"]
        first = out.loc[f"roadwork/{original.name}"]
        assert copy["source"] == "manifest" and first["source"] == "a"
        assert copy["group_key"] == first["group_key"] and copy["split"] == first["split"]
    assert check_split_leakage(result.assignment, rule).ok
    assert out.loc["images/exact_0.png", "split"] == out.loc[f"roadwork/{originals[0].name}", "split"]
    # the leakage check itself sees copies across sources put in other splits: the exact
    # one fails it, the resized one is listed as a possible copy
    bad = result.assignment.copy()
    other = "val_test" if out.loc["images/exact_0.png", "split"] != "val_test" else "train"
    bad.loc[bad["item_id"].isin(["images/exact_0.png", "images/copy_0.jpg"]), "split"] = other
    report = check_split_leakage(bad, rule)
    assert not report.ok and report.n_exact_groups == 1
    assert report.n_near_pairs + report.n_possible_pairs >= 1
    assert "images/exact_0.png" in " ".join(report.examples)


def test_holdout_source_is_val_test_alone_and_stays_stable(tmp_path):
    a, b, originals = _with_copies(tmp_path)
    ingested, _ = ingest_images(load_sources(f"{a}{SEP}{b}", tmp_path / "cache"))
    rule = NearDuplicateRule()
    result = split_images(ingested, FRACTIONS, seed=0, rule=rule, holdout_source="manifest")
    out = result.assignment
    held = out["source"] == "manifest"
    assert (out.loc[held, "split"] == "val_test").all()
    # val_test = the held-out source plus a's originals of its copies, nothing else of a
    a_test = set(out.loc[~held & (out["split"] == "val_test"), "item_id"])
    assert a_test == {f"roadwork/{p.name}" for p in originals}
    assert set(out.loc[~held, "split"]) == {"train", "val_select", "val_calib", "val_test"}
    assert check_split_leakage(out, rule).ok
    shape = split_shape_report(out, FRACTIONS, max_group_share=0.1, holdout_source="manifest")
    assert shape.realised["val_test"] == 0.0 and shape.configured["val_test"] == 0.0
    assert abs(sum(shape.realised.values()) - 1.0) < 1e-9
    # without the holdout the same data puts a's images in val_test by hash
    plain = split_shape_report(out, FRACTIONS, max_group_share=0.1)
    assert not plain.ok
    # stability: new images of both sources, previous assignment reused -> nobody moves
    extra = write_class_folders(generate_awkward(10, seed=13, image_size=96), tmp_path / "a2")
    for path in [p for p in extra.rglob("*") if p.is_file()]:
        path.rename(a / path.parent.name / f"new_{path.name}")
    grown = ingest_images(load_sources(f"{a}{SEP}{b}", tmp_path / "cache"))[0]
    assert len(grown) == len(ingested) + 10
    again = split_images(grown, FRACTIONS, seed=0, rule=rule, previous=out,
                         holdout_source="manifest").assignment.set_index("item_id")["split"]
    before = out.set_index("item_id")["split"]
    assert (again.reindex(before.index) == before).all()
    assert (again[again.index.str.startswith("none/new_") | again.index.str.startswith(
        "roadwork/new_")] != "val_test").all()


def test_holdout_naming_no_source_is_refused(two_layouts, tmp_path):
    _, a, _, _ = two_layouts
    ingested, _ = ingest_images(load_sources(str(a), tmp_path / "cache"))
    with pytest.raises(BadInputError, match=r"holdout_source = 'b' names no source .* \['a'\]"):
        split_images(ingested, FRACTIONS, holdout_source="b")
    with pytest.raises(BadInputError, match=r"would put every image in val_test"):
        split_images(ingested, FRACTIONS, holdout_source="a")


def test_source_sample_weights_give_each_source_its_share():
    sources = ["a"] * 90 + ["b"] * 10
    assert np.array_equal(source_sample_weights(sources, SourceBalance()), np.ones(100))
    w = source_sample_weights(sources, SourceBalance(mode="equal"))
    assert w.mean() == pytest.approx(1.0)
    assert w[:90].sum() == pytest.approx(50.0) and w[90:].sum() == pytest.approx(50.0)
    w = source_sample_weights(sources, SourceBalance(mode="weights", weights={"a": 1, "b": 3}))
    assert w[90:].sum() / w.sum() == pytest.approx(0.75)
    with pytest.raises(BadInputError, match=r"lacks a weight > 0 for train source\(s\) \['b'\]"):
        source_sample_weights(sources, SourceBalance(mode="weights", weights={"a": 1}))
