"""Tests for the independent awkward-scene generator (roadwork_assets_tests/awkward_data.py)."""

from __future__ import annotations

import ast
import csv
import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from roadwork_assets.core.data.images import perceptual_hash
from roadwork_assets.core.data.sources import load_source, source_quarantine
from roadwork_assets_tests.awkward_data import (
    STYLES,
    copy_transforms,
    encode_item,
    generate_awkward,
    near_copy_groups,
    write_class_folders,
    write_manifest_csv,
    write_natix_parquet,
)

SIZE = 64


def _ham(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@pytest.fixture(scope="module")
def mixed():
    return generate_awkward(60, seed=5, image_size=SIZE, n_copies=14)


def test_module_is_independent_of_the_default_generator() -> None:
    source = Path(__file__).with_name("awkward_data.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.startswith("roadwork_assets") for name in imported), imported


def test_same_seed_same_bytes_other_seed_other_images() -> None:
    a = generate_awkward(24, seed=3, image_size=SIZE, n_copies=7)
    b = generate_awkward(24, seed=3, image_size=SIZE, n_copies=7)
    c = generate_awkward(24, seed=4, image_size=SIZE, n_copies=7)
    assert [encode_item(x) for x in a] == [encode_item(x) for x in b]
    assert [(x.item_id, x.label, x.style, x.burst_id, x.copy_of) for x in a] == \
           [(x.item_id, x.label, x.style, x.burst_id, x.copy_of) for x in b]
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]


def test_styles_follow_the_requested_proportions() -> None:
    weights = {"low_texture": 0.5, "night": 0.25, "burst": 0.25}
    items = generate_awkward(40, seed=1, image_size=32, styles=weights, burst_size=4)
    counts = Counter(it.style for it in items)
    assert counts == {"low_texture": 20, "night": 10, "burst": 10}
    items = generate_awkward(50, seed=1, image_size=32)
    assert set(Counter(it.style for it in items)) == set(STYLES)
    with pytest.raises(ValueError):
        generate_awkward(4, styles={"sunny": 1.0})


def test_items_are_well_formed(mixed) -> None:
    ids = [it.item_id for it in mixed]
    assert len(set(ids)) == len(ids) == 74
    originals = [it for it in mixed if it.copy_of is None]
    assert abs(np.mean([it.label for it in originals]) - 0.45) <= 0.1
    for it in mixed:
        assert it.label in (0, 1)
        assert it.image.mode == ("L" if it.style == "grayscale" else "RGB")
        if it.copy_of is None:
            assert it.image.size == (SIZE, SIZE)
        if it.label == 1:
            assert set(it.objects) & {"cone", "barrier", "sign", "drum"}
        else:
            assert not set(it.objects) & {"cone", "barrier", "sign", "drum"}
    by_id = {it.item_id: it for it in mixed}
    copies = [it for it in mixed if it.copy_of is not None]
    assert {it.copy_transform for it in copies} == set(copy_transforms)
    assert all(by_id[it.copy_of].label == it.label for it in copies)
    bursts = Counter(it.burst_id for it in mixed if it.burst_id and it.copy_of is None)
    assert bursts and all(n <= 3 for n in bursts.values())
    groups = near_copy_groups(mixed)
    for it in copies:
        assert groups[it.item_id] == groups[it.copy_of]


def test_layout_repeat_shares_layouts_across_different_images() -> None:
    items = generate_awkward(24, seed=2, image_size=SIZE, styles={"layout_repeat": 1.0})
    by_layout: dict[str, list] = {}
    for it in items:
        by_layout.setdefault(it.scene_layout, []).append(it)
    assert len(by_layout) == 4 and all(len(v) == 6 for v in by_layout.values())
    for group in by_layout.values():
        assert len({it.image.tobytes() for it in group}) == len(group)


def test_low_texture_distinct_scenes_share_near_identical_phashes() -> None:
    """Why pHash alone cannot find near-duplicates: many *distinct* flat scenes (other
    colours, boxes, objects) fall within 6 bits of each other, while distinct ordinary
    street scenes almost never do."""
    flat = generate_awkward(30, seed=9, image_size=SIZE, styles={"low_texture": 1.0})
    street = generate_awkward(30, seed=9, image_size=SIZE, styles={"street": 1.0})
    assert len({it.image.tobytes() for it in flat}) == 30

    def close_share(items) -> float:
        hashes = [perceptual_hash(it.image) for it in items]
        return float(np.mean([_ham(a, b) <= 6 for a, b in itertools.combinations(hashes, 2)]))

    assert close_share(flat) >= 0.15
    assert close_share(street) <= 0.02


def test_bursts_and_copies_stay_within_a_few_bits() -> None:
    items = generate_awkward(24, seed=6, image_size=SIZE, styles={"burst": 1.0}, n_copies=21)
    by_id = {it.item_id: it for it in items}
    frames: dict[str, list] = {}
    for it in items:
        if it.copy_of is None:
            frames.setdefault(it.burst_id, []).append(perceptual_hash(it.image))
    burst = [_ham(a, b) for hs in frames.values() for a, b in itertools.combinations(hs, 2)]
    assert len(frames) == 8 and np.median(burst) <= 4 and max(burst) <= 12
    copies = [_ham(perceptual_hash(it.image), perceptual_hash(by_id[it.copy_of].image))
              for it in items if it.copy_of is not None]
    assert len(copies) == 21 and max(copies) <= 8


def test_copy_transforms_keep_mode() -> None:
    gray = generate_awkward(1, seed=0, image_size=SIZE, styles={"grayscale": 1.0})[0].image
    for name, fn in copy_transforms.items():
        out = fn(gray)
        assert out.mode == "L", name
    assert copy_transforms["resize90"](gray).size == (58, 58)
    assert copy_transforms["exact"](gray).tobytes() == gray.tobytes()


@pytest.mark.parametrize("image_column_first", [False, True])
def test_natix_parquet_loads_through_the_project_reader(mixed, tmp_path, image_column_first) -> None:
    path = write_natix_parquet(mixed, tmp_path / "natix" / "train-0.parquet",
                               image_column_first=image_column_first)
    names = pq.read_schema(path).names
    assert (names[0] == "image") == image_column_first
    records = load_source(path, tmp_path / "cache")
    assert len(records) == len(mixed) and source_quarantine(records).empty
    assert records["label"].tolist() == [it.label for it in mixed]
    assert records["group_id"].isna().all()
    table = pq.read_table(path).to_pandas()
    assert all(table.loc[table["label"] == 1, "scene_description"].str.len() > 0)
    assert table["width"].tolist() == [it.image.size[0] for it in mixed]


def test_manifest_and_class_folders_load_through_the_project_reader(mixed, tmp_path) -> None:
    manifest = write_manifest_csv(mixed, tmp_path / "m")
    with open(manifest, newline="") as fh:
        assert next(csv.reader(fh)) == ["path", "label"]
    records = load_source(manifest, tmp_path / "cache")
    assert records["label"].tolist() == [it.label for it in mixed]
    assert records["group_id"].isna().all()
    grouped = load_source(write_manifest_csv(mixed, tmp_path / "g", with_groups=True), tmp_path / "cache")
    assert grouped["group_id"].notna().all()
    folders = load_source(write_class_folders(mixed, tmp_path / "f"), tmp_path / "cache")
    assert sorted(folders["label"].tolist()) == sorted(it.label for it in mixed)
    assert folders["group_id"].isna().all()
    assert {Path(u).suffix for u in folders["uri"]} == {".jpg", ".png"}
