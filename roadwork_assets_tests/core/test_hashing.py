"""One "hash a key into [0, 1)" helper; the assignments made from it are unchanged.

The expected values were computed with the two helpers it replaced (commit 87408e5:
`core.data.splits._unit_hash` and the inline hash in `split_calibration_set`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from roadwork_assets.core.calibration.policies import split_calibration_set
from roadwork_assets.core.data.splits import assign_splits
from roadwork_assets.core.hashing import unit_hash


def test_unit_hash_values_of_both_former_helpers():
    # core.data.splits: 53 bits of sha256(f"{seed}\x00{key}"), seed 3
    assert unit_hash(["3\x00a", "3\x00group:scene1", "3\x00pixels:ff"]).tolist() == [
        0.5703705757870642, 0.00761696917182253, 0.5939637900597661]
    # core.calibration.policies: the first 13 hex digits of sha256(f"{salt}:{group}")
    keys = ["roadwork_assets.val_calib:s1", "roadwork_assets.val_calib:scene-7"]
    expected = [int(hashlib.sha256(k.encode()).hexdigest()[:13], 16) / float(16**13) for k in keys]
    assert unit_hash(keys, bits=52).tolist() == expected
    u = unit_hash([f"k{i}" for i in range(2000)])
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert unit_hash([]).shape == (0,)
    with pytest.raises(ValueError, match="bits"):
        unit_hash(["a"], bits=54)


def test_split_assignment_is_byte_identical_to_before():
    n = 60
    frame = pd.DataFrame({
        "item_id": [f"img{i:03d}" for i in range(n)], "label": [i % 2 for i in range(n)],
        "pixel_sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
        "group_id": [f"scene{i // 3}" if i % 4 else None for i in range(n)],
    })
    a = assign_splits(frame, seed=3)
    code = {"train": "T", "val_select": "S", "val_calib": "C", "val_test": "E"}
    assert a["item_id"].tolist() == sorted(frame["item_id"])
    assert "".join(code[s] for s in a["split"]) == (
        "TTTTTTTTTCCCSTTTTTTTSSSSEEESTSTTTCCCTTTECECCTEEETCCSTSTTSTTT")


def test_val_calib_group_split_is_unchanged():
    ids = [f"i{i}" for i in range(40)]
    y = np.array([i % 3 == 0 for i in range(40)], dtype=int)
    groups = [f"s{i // 4}" for i in range(40)]
    fit, _ = split_calibration_set(ids, y, 0.5, groups=groups)
    assert fit.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 26, 27,
                            32, 33, 34, 35, 36, 37, 38, 39]
