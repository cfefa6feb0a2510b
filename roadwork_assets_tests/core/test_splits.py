"""Split assignment: deterministic, stable under additions/removals, group-preserving."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.artifacts import atomic_write_parquet, file_sha256
from roadwork_assets.core.data.splits import (
    DEFAULT_FRACTIONS,
    assign_splits,
    check_split_sizes,
)


def _frame(n: int, start: int = 0, groups: int | None = None, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    idx = np.arange(start, start + n)
    return pd.DataFrame({
        "item_id": [f"img{i:06d}" for i in idx],
        "label": rng.integers(0, 2, n).astype(np.int8),
        "group_id": [f"scene{i // 3}" if groups else None for i in idx],
        "pixel_sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in idx],
        "phash": [f"{(int(i) * 0x9E3779B97F4A7C15) % (1 << 64):016x}" for i in idx],
    })


def test_adding_images_never_moves_existing_ones():
    base = assign_splits(_frame(2000))
    grown = assign_splits(pd.concat([_frame(2000), _frame(700, start=2000, seed=1)]))
    merged = base.merge(grown, on="item_id", suffixes=("_before", "_after"))
    assert len(merged) == 2000
    assert (merged["split_before"] == merged["split_after"]).all()


def test_removing_images_never_moves_the_rest():
    full = assign_splits(_frame(2000))
    kept = full.sample(frac=0.6, random_state=0)["item_id"]
    reduced = assign_splits(_frame(2000).loc[lambda f: f["item_id"].isin(kept)])
    merged = full.merge(reduced, on="item_id", suffixes=("_full", "_reduced"))
    assert (merged["split_full"] == merged["split_reduced"]).all()


def test_same_data_same_seed_gives_byte_identical_manifest(tmp_path):
    shuffled = _frame(500).sample(frac=1.0, random_state=3)
    a = atomic_write_parquet(tmp_path / "a.parquet", assign_splits(_frame(500), seed=7))
    b = atomic_write_parquet(tmp_path / "b.parquet", assign_splits(shuffled, seed=7))
    assert file_sha256(a) == file_sha256(b)
    assert not assign_splits(_frame(500), seed=8)["split"].equals(
        assign_splits(_frame(500), seed=7)["split"])


def test_fractions_and_class_balance_match_within_binomial_noise():
    out = assign_splits(_frame(20000))
    for split, frac in DEFAULT_FRACTIONS.items():
        share = (out["split"] == split).mean()
        se = np.sqrt(frac * (1 - frac) / len(out))
        assert abs(share - frac) < 4 * se, (split, share, frac)
        pos_share = out.loc[out["split"] == split, "label"].mean()
        assert abs(pos_share - out["label"].mean()) < 0.05


def test_groups_stay_in_one_split():
    out = assign_splits(_frame(900, groups=3))
    assert (out.groupby("group_id")["split"].nunique() == 1).all()


@pytest.mark.parametrize("bad", [
    {"train": 0.5, "val_select": 0.5},
    {"train": 0.7, "val_select": 0.1, "val_calib": 0.1, "val_test": 0.2},
    {"train": 1.0, "val_select": 0.0, "val_calib": 0.0, "val_test": 0.0},
])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(BadInputError, match="fractions"):
        assign_splits(_frame(10), bad)


def test_empty_split_and_one_class_split_are_refused():
    out = assign_splits(_frame(400))
    one_class = out.copy()
    one_class.loc[one_class["split"] == "val_test", "label"] = 0
    with pytest.raises(InsufficientDataError, match="val_test.*no roadwork"):
        check_split_sizes(one_class)
    empty = out[out["split"] != "val_select"]
    with pytest.raises(InsufficientDataError, match="'val_select' is empty"):
        check_split_sizes(empty)
