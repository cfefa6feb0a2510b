"""Per-source training draw weights (``dataset.source_balance``).

Several sources rarely come in useful proportions: 50k NATIX frames beside 2k photos of
one city would let the larger source decide what "roadwork" looks like. Balancing
gives source s a share pi_s of the train draws instead of its image share n_s / N:

    w_i = pi_{s(i)} / n_{s(i)} * N / sum_s pi_s        (mean weight over train = 1)

with pi_s = 1 (``equal``) or the configured weight (``weights``); ``none`` is w_i = 1.
The trainer multiplies these into its own draw weights (class balance, hard negatives).

Only training is balanced, never by dropping or reweighting calibration or test rows:
the exit policy's guarantee (FNR <= alpha, CRC/LTT) holds over the distribution that
val_calib is drawn from, and val_test reports how the served bundle does on that same
distribution. Reweighting or dropping rows there would make the certificate speak of a
mixture nobody serves, and the per-source test table already shows each source's
numbers with exact intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from roadwork_assets.contracts.errors import BadInputError

__all__ = ["SourceBalance", "source_sample_weights"]


class SourceBalance(BaseModel):
    """``mode``: none | equal | weights; ``weights``: {source: relative share} (weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["none", "equal", "weights"] = "none"
    weights: dict[str, float] = Field(default_factory=dict)


def source_sample_weights(sources: Sequence[str], balance: SourceBalance) -> np.ndarray:
    """Draw weights (mean 1) of the train rows whose sources are ``sources``."""
    src = np.asarray(sources, dtype=object)
    if balance.mode == "none" or len(src) == 0:
        return np.ones(len(src), dtype=np.float64)
    names, inverse, counts = np.unique(src.astype(str), return_inverse=True, return_counts=True)
    share = _shares(names.tolist(), balance.mode, balance.weights)
    per_image = share / counts
    w = per_image[inverse]
    return w * (len(w) / w.sum())


def _shares(names: list[str], mode: str, weights: Mapping[str, float]) -> np.ndarray:
    if mode == "equal":
        return np.ones(len(names), dtype=np.float64)
    missing = [n for n in names if n not in weights]
    bad = {k: v for k, v in weights.items() if not v > 0}
    if missing or bad:
        raise BadInputError(
            f"dataset.source_weights = {dict(weights)} lacks a weight > 0 for train "
            f"source(s) {missing or sorted(bad)}: give every train source a positive weight "
            f"(train sources: {names}), or set dataset.source_balance to equal or none")
    return np.array([float(weights[n]) for n in names], dtype=np.float64)
