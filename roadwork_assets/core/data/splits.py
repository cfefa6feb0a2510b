"""Deterministic, stable split assignment.

Each item's split is a pure function of (seed, group key): the group key is the
scene / sequence id when the source has one, else the decoded-pixel hash. A group's
key is hashed to a number u in [0, 1) and the split is the bucket of the cumulative
fractions that u falls into. Consequences, each tested:

- adding images never moves an existing image (its u does not change);
- removing images never moves the rest;
- all images of one group land in the same split (no scene leaks across splits);
- same data + same seed -> byte-identical manifest.

Stratification is in expectation: each label's groups are assigned independently
with the same fractions, so every split's class ratio matches the whole up to
binomial noise. Exact per-split class counts would need a rank-based assignment,
and ranks move when data is added — that would break stability, which matters more.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.splits import SPLITS

DEFAULT_FRACTIONS: dict[str, float] = {
    "train": 0.55,
    "val_select": 0.10,
    "val_calib": 0.25,
    "val_test": 0.10,
}


def validate_fractions(fractions: dict[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS):
        raise BadInputError(
            f"split fractions must name exactly {list(SPLITS)}; got {sorted(fractions)}"
        )
    bad = {k: v for k, v in fractions.items() if not (0.0 < float(v) < 1.0)}
    if bad:
        raise BadInputError(f"split fractions must lie in (0, 1); offending: {bad}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise BadInputError(f"split fractions must sum to 1; they sum to {total:.6f}")
    return {s: float(fractions[s]) for s in SPLITS}


def group_keys(frame: pd.DataFrame) -> pd.Series:
    """Scene/sequence id where present, else the decoded-pixel hash."""
    if "group_id" in frame:
        gid = frame["group_id"].astype("string")
        has = gid.notna() & (gid.str.len() > 0)
        return ("group:" + gid).where(has, "pixels:" + frame["pixel_sha256"].astype("string"))
    return "pixels:" + frame["pixel_sha256"].astype("string")


def merge_near_duplicate_groups(frame: pd.DataFrame, max_distance: int) -> pd.Series:
    """Group keys where near-duplicate images (pHash within ``max_distance``) share one key.

    A resized or re-compressed copy without a group id would otherwise be hashed on its
    own and could land in another split. Each connected component of the near-duplicate
    graph takes the smallest base key of its members, so an image that joins no
    component keeps its key: stability only yields where a new image links two existing
    components (then the merged component follows one of the two keys).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from roadwork_assets.core.data.dedup import near_duplicate_pairs, phash_array

    base = group_keys(frame).astype(str).reset_index(drop=True)
    if "phash" not in frame or max_distance < 0 or len(frame) < 2:
        return base
    i, j, _ = near_duplicate_pairs(phash_array(frame["phash"]), max_distance)
    if len(i) == 0:
        return base
    # also join items that already share a base key, so components respect groups
    codes, _ = pd.factorize(base)
    n = len(frame)
    rows = np.concatenate([i, np.arange(n)])
    cols = np.concatenate([j, n + codes])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n + codes.max() + 1,) * 2)
    _, comp = connected_components(graph, directed=False)
    comp = comp[:n]
    smallest = base.groupby(comp).transform("min")
    return smallest


def _unit_hash(keys: pd.Series, seed: int) -> np.ndarray:
    # 53 bits of sha256 -> a float in [0, 1); independent of the other keys.
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys.tolist()):
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        out[i] = (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)
    return out


def assign_splits(
    frame: pd.DataFrame,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    near_duplicate_distance: int | None = None,
) -> pd.DataFrame:
    """Return ``frame`` sorted by item_id with a ``split`` column and ``group_key``.

    Requires columns ``item_id``, ``label``, ``pixel_sha256``; ``group_id`` optional.
    With ``near_duplicate_distance`` (and a ``phash`` column), near-duplicate images are
    kept in one split (see :func:`merge_near_duplicate_groups`).
    """
    fr = validate_fractions(fractions or DEFAULT_FRACTIONS)
    missing = {"item_id", "label", "pixel_sha256"} - set(frame.columns)
    if missing:
        raise BadInputError(f"cannot assign splits: missing columns {sorted(missing)}")
    out = frame.sort_values("item_id", kind="stable").reset_index(drop=True).copy()
    if near_duplicate_distance is None:
        out["group_key"] = group_keys(out).astype(str).to_numpy()
    else:
        out["group_key"] = merge_near_duplicate_groups(out, near_duplicate_distance).to_numpy()
    u_group = pd.Series(_unit_hash(pd.Series(out["group_key"].unique()), seed),
                        index=out["group_key"].unique())
    u = out["group_key"].map(u_group).to_numpy()
    edges = np.cumsum([fr[s] for s in SPLITS])
    edges[-1] = 1.0 + 1e-12
    out["split"] = np.asarray(SPLITS, dtype=object)[np.searchsorted(edges, u, side="right")]
    return out


def split_counts(assignment: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {"n": .., "positive": .., "negative": ..}} for metadata."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        part = assignment[assignment["split"] == split]
        pos = int((part["label"] == 1).sum())
        counts[split] = {"n": int(len(part)), "positive": pos, "negative": int(len(part) - pos)}
    return counts


def check_split_sizes(assignment: pd.DataFrame, min_calib_positives: int) -> None:
    """Refuse empty or one-class splits, and a val_calib too small for the exit policy."""
    counts = split_counts(assignment)
    for split, c in counts.items():
        if c["n"] == 0:
            raise InsufficientDataError(
                f"split {split!r} is empty ({len(assignment)} images in all): add data or "
                "raise its fraction in the split config"
            )
        if c["positive"] == 0 or c["negative"] == 0:
            missing = "roadwork (1)" if c["positive"] == 0 else "none (0)"
            raise InsufficientDataError(
                f"split {split!r} has no {missing} images ({c}); every split needs both "
                "classes: add data of that class or change the split fractions"
            )
    have = counts["val_calib"]["positive"]
    if have < min_calib_positives:
        raise InsufficientDataError(
            f"val_calib has {have} positive images; the exit policy at the configured "
            f"alpha needs at least {min_calib_positives} (val_calib is halved into a "
            "fitting part and a threshold part). Add roadwork images, raise the "
            "val_calib fraction, or raise alpha."
        )
