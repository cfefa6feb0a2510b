"""Tests for the embedded default dataset generator (core/data/synthetic/dataset.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from roadwork_assets.core.data.synthetic import (
    GENERATOR_VERSION,
    HARD_NEGATIVE_KINDS,
    LIGHTINGS,
    MANIFEST_COLUMNS,
    ROADWORK_KINDS,
    generate_default_dataset,
)

N = 40
SIZE = 64


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "default"
    generate_default_dataset(out, n_images=N, seed=3, image_size=SIZE)
    return out


def test_manifest_columns_and_types(dataset: Path) -> None:
    with open(dataset / "manifest.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == MANIFEST_COLUMNS
    rows = _rows(dataset / "manifest.csv")
    assert len(rows) == N
    for r in rows:
        assert r["label"] in ("0", "1")
        assert not Path(r["path"]).is_absolute() and "\\" not in r["path"]
        assert r["path"].startswith("images/roadwork/" if r["label"] == "1" else "images/none/")
        assert r["group_id"]
        assert r["lighting"] in LIGHTINGS
        if r["label"] == "1":
            assert r["scene_kind"] in ROADWORK_KINDS
        else:
            assert r["scene_kind"] == "plain" or r["scene_kind"] in HARD_NEGATIVE_KINDS
    assert len({r["path"] for r in rows}) == N


def test_dataset_json_records_parameters(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["generator_version"] == GENERATOR_VERSION
    assert (meta["n_images"], meta["seed"], meta["image_size"]) == (N, 3, SIZE)
    assert meta["positive_fraction"] == 0.5 and meta["frames_per_scene"] == 2


def test_label_balance_near_positive_fraction(tmp_path: Path) -> None:
    for fraction in (0.5, 0.3):
        rows = _rows(generate_default_dataset(tmp_path / str(fraction), n_images=N, seed=1,
                                              image_size=32, positive_fraction=fraction))
        share = sum(int(r["label"]) for r in rows) / len(rows)
        assert abs(share - fraction) <= 0.1


def test_frames_of_a_group_share_label_and_kind(dataset: Path) -> None:
    groups: dict[str, set] = {}
    for r in _rows(dataset / "manifest.csv"):
        groups.setdefault(r["group_id"], set()).add((r["label"], r["scene_kind"], r["lighting"]))
    assert len(groups) == N // 2
    assert all(len(v) == 1 for v in groups.values())


def test_frames_of_a_scene_are_near_duplicates_but_not_identical(dataset: Path) -> None:
    import numpy as np

    rows = _rows(dataset / "manifest.csv")
    a, b = (np.asarray(Image.open(dataset / r["path"]), dtype=np.float32) for r in rows[:2])
    assert rows[0]["group_id"] == rows[1]["group_id"]
    other = np.asarray(Image.open(dataset / rows[2]["path"]), dtype=np.float32)
    assert 0 < np.abs(a - b).mean() < np.abs(a - other).mean()


def test_images_decode_as_rgb_of_requested_size(dataset: Path) -> None:
    for r in _rows(dataset / "manifest.csv"):
        with Image.open(dataset / r["path"]) as im:
            assert im.format == "JPEG"
            im.load()
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)


def test_deterministic_bytes(tmp_path: Path) -> None:
    m1 = generate_default_dataset(tmp_path / "a", n_images=12, seed=7, image_size=48)
    m2 = generate_default_dataset(tmp_path / "b", n_images=12, seed=7, image_size=48)
    assert m1.read_bytes() == m2.read_bytes()
    for r in _rows(m1):
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()
    m3 = generate_default_dataset(tmp_path / "c", n_images=12, seed=8, image_size=48)
    assert any((tmp_path / "a" / r["path"]).read_bytes() != (tmp_path / "c" / r["path"]).read_bytes()
               for r in _rows(m3))


def test_scene_does_not_depend_on_n_images(tmp_path: Path) -> None:
    small = generate_default_dataset(tmp_path / "s", n_images=6, seed=2, image_size=32)
    big = generate_default_dataset(tmp_path / "b", n_images=10, seed=2, image_size=32)
    rows_s, rows_b = _rows(small), _rows(big)
    assert rows_b[:6] == rows_s
    for r in rows_s:
        assert (tmp_path / "s" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()


def test_idempotent_second_call_does_not_rewrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = generate_default_dataset(out, n_images=8, seed=0, image_size=32)
    files = [manifest, out / "dataset.json"] + [out / r["path"] for r in _rows(manifest)]
    before = {f: f.stat().st_mtime_ns for f in files}
    assert generate_default_dataset(out, n_images=8, seed=0, image_size=32) == manifest
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_changed_parameters_or_missing_file_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    manifest = generate_default_dataset(out, n_images=8, seed=0, image_size=32)
    first = _rows(manifest)[0]["path"]
    (out / first).unlink()
    generate_default_dataset(out, n_images=8, seed=0, image_size=32)
    assert (out / first).is_file()
    generate_default_dataset(out, n_images=5, seed=0, image_size=32)
    assert len(_rows(manifest)) == 5
    assert not list(out.glob("images/*/scene-000003_*"))
    # nothing but the dataset itself is left beside it (no temporary or stale directories)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_last_scene_may_have_fewer_frames(tmp_path: Path) -> None:
    rows = _rows(generate_default_dataset(tmp_path / "odd", n_images=7, seed=0, image_size=32, frames_per_scene=3))
    assert len(rows) == 7
    assert [sum(r["group_id"] == g for r in rows) for g in sorted({r["group_id"] for r in rows})] == [3, 3, 1]


def test_scene_kinds_cover_hard_negatives_and_roadwork(tmp_path: Path) -> None:
    rows = _rows(generate_default_dataset(tmp_path / "kinds", n_images=200, seed=0, image_size=16))
    kinds = {r["scene_kind"] for r in rows}
    assert len(kinds & set(ROADWORK_KINDS)) >= 4
    assert len(kinds & set(HARD_NEGATIVE_KINDS)) >= 3
    assert "plain" in kinds
    negatives = [r for r in rows if r["label"] == "0"]
    hard = sum(r["scene_kind"] != "plain" for r in negatives) / len(negatives)
    assert 0.2 <= hard <= 0.6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_images": 0}, "n_images"),
        ({"positive_fraction": 0.0}, "positive_fraction"),
        ({"positive_fraction": 1.0}, "positive_fraction"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"frames_per_scene": 0}, "frames_per_scene"),
        ({"image_size": 4}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_default_dataset(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
