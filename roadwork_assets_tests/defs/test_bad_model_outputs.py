"""NaN / inf or misaligned logits: the blocking check fails and names the items; the
policy fitter and the evaluator refuse such logits too."""

import numpy as np
import pandas as pd
import pytest

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.defs.training.assets import _logits_check


def _cache(n=6):
    """The split's manifest, which the check compares the written logits against."""
    return pd.DataFrame({"item_id": [f"img{i}" for i in range(n)],
                         "label": np.array([0, 1] * (n // 2), np.int8)})


def _written(logits, manifest):
    return {"logits": logits, "labels": manifest["label"].to_numpy(np.int8),
            "item_ids": manifest["item_id"].to_numpy(dtype=str)}


def test_finite_aligned_logits_pass():
    cache = _cache()
    assert _logits_check(_written(np.zeros((6, 2, 2), np.float32), cache), cache).passed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_fail_the_check_naming_items(bad):
    cache = _cache()
    z = np.zeros((6, 2, 2), np.float32)
    z[4, 1, 0] = bad
    result = _logits_check(_written(z, cache), cache)
    assert not result.passed
    assert "1 item(s) with NaN/inf logits" in result.description
    assert "img4" in result.description


def test_misaligned_ids_and_labels_fail_the_check():
    cache = _cache()
    shuffled = _written(np.zeros((6, 2, 2), np.float32), cache)
    shuffled["item_ids"] = shuffled["item_ids"][::-1]
    assert "item ids differ" in _logits_check(shuffled, cache).description
    relabelled = _written(np.zeros((6, 2, 2), np.float32), cache)
    relabelled["labels"] = 1 - relabelled["labels"]
    assert "labels differ" in _logits_check(relabelled, cache).description


def test_policy_fitting_refuses_nan_logits():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    z = np.stack([np.zeros(n), 2 * y - 1 + rng.normal(size=n)], axis=1)[:, None, :]
    z[7, 0, 1] = np.nan
    with pytest.raises(BadInputError, match=r"NaN/inf\) in 1 row\(s\), first rows \[7\]"):
        fit_policy("softmax", z, y, [f"i{i}" for i in range(n)], alpha=0.1)
