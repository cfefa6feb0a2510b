"""Content leakage between splits: the same picture, a near copy, or one scene in two splits.

Three detectors over a table with ``item_id``, ``split``, ``pixel_sha256``, ``phash``
(16 hex chars or an int) and ``group_id``:

- :func:`find_exact_duplicates` - identical decoded pixels (any container) in >1 split;
- :func:`find_near_duplicates` - 64-bit pHashes within ``max_distance`` bits in
  different splits (a resized / re-compressed / slightly cropped copy), confirmed by
  the thumbnails (``core.data.similarity``) so that a shared layout is not a copy;
- :func:`find_shared_groups` - one ``group_id`` (scene, sequence) in >1 split.

Near duplicates use multi-index hashing (Norouzi et al., CVPR 2012), so the cost is far
from quadratic. Split the 64-bit hash into ``m`` chunks with probe radii ``r_k``,
``sum(r_k + 1) >= d + 1``; two hashes within ``d`` bits then differ by at most ``r_k``
bits on some chunk ``k`` (pigeonhole: otherwise they would differ by at least
``sum(r_k + 1) > d``). Per chunk, items are bucketed by chunk value and every item
probes the values within ``r_k`` bits of its own; candidates are verified with a
vectorised popcount. The textbook split ``m = d + 1``, ``r = 0`` gives ~9-bit chunks for
d = 6: buckets of ~200 items at n = 100k and candidates growing as n^2 / 2^9 (measured
~150x slower for 10x the items). A cost model instead picks e.g. 4 x 16-bit chunks with
radii 1, 1, 1, 0, whose buckets hold ~1 item at 100k (see
``benchmarks/bench_near_duplicates.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations, zip_longest
from math import comb

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError, LeakageError
from roadwork_assets.core.data.similarity import (
    NearDuplicateRule,
    confirm_pairs,
    thumbnail_array,
)

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "LeakageReport",
    "check_split_leakage",
    "find_exact_duplicates",
    "find_near_duplicates",
    "find_shared_groups",
    "near_duplicate_pairs",
    "phash_array",
]

# Chosen from measurements (numbers in roadwork_assets_tests/core/data/test_dedup.py):
# copies resized to 90 %, JPEG q50 and 3 % border-cropped land at 2-4 bits on real photos
# (<= 6 for 94 % of synthetic scenes); the closest of 200 distinct synthetic street scenes
# are 10 bits apart, and <= 6 bits happens for ~3e-6 of distinct pairs.
DEFAULT_MAX_DISTANCE = 6
_PROBES_PER_BLOCK = 2_000_000  # bounds memory of one vectorised probe block (~60 MB)
_ITEMS_PER_EXAMPLE = 5
_TABLE_BITS = 24  # chunks up to this width use a bucket table (<= 128 MB) instead of bisection


# ------------------------------------------------------------------ near duplicates core


def phash_array(values: pd.Series | list | np.ndarray) -> np.ndarray:
    """pHashes (16-char hex strings or ints) as a uint64 array."""
    values = pd.Series(values).reset_index(drop=True)
    if values.empty:
        return np.zeros(0, dtype=np.uint64)
    if pd.api.types.is_integer_dtype(values.dtype):
        return values.to_numpy().astype(np.uint64)
    if all(isinstance(v, (int, np.integer)) for v in values):
        return np.array([int(v) for v in values], dtype=np.uint64)
    texts = values.astype(str)
    bad = texts[(texts.str.len() != 16) | ~texts.str.fullmatch(r"[0-9a-fA-F]*")]
    if len(bad):
        raise BadInputError(
            f"{len(bad)} phash value(s) are not 16 hex characters, e.g. {bad.iloc[0]!r} "
            f"at row {bad.index[0]}; recompute them with core.data.ingest.ingest_images."
        )
    return np.frombuffer(bytes.fromhex("".join(texts)), dtype=">u8").astype(np.uint64)


Plan = list[tuple[int, int, int]]  # (shift, width, radius) per chunk


def _chunk_plan(n: int, max_distance: int) -> Plan:
    """Pick chunks and per-chunk probe radii minimising the expected work.

    Generalised pigeonhole: with radii r_k and sum(r_k + 1) >= d + 1, two hashes within
    d bits agree within r_k bits on some chunk k. For m chunks the smallest radii are
    d + 1 - m spread as evenly as possible (d = 6, m = 4: 1, 1, 1, 0). Work per item is
    the probes (values within r_k of the item's chunk) times (1 + expected bucket size
    n / 2^width); a probe and a candidate cost about the same when measured.
    """
    best: tuple[float, Plan] | None = None
    for m in range(1, max_distance + 2):
        widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
        q, extra = divmod(max_distance + 1 - m, m)
        radii = [q + 1 if k < extra else q for k in range(m)]
        shifts = [sum(widths[:k]) for k in range(m)]
        plan = list(zip(shifts, widths, radii))
        cost = sum(
            sum(comb(b, k) for k in range(r + 1)) * (1 + n / 2.0**b) for _, b, r in plan
        )
        if best is None or cost < best[0]:
            best = (cost, plan)
    return best[1]


def _flip_masks(width: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks.extend(sum(1 << b for b in bits) for bits in combinations(range(width), k))
    return np.array(masks, dtype=np.uint64)


def near_duplicate_pairs(
    hashes: np.ndarray,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    *,
    codes: np.ndarray | None = None,
    plan: Plan | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs ``i < j`` with ``popcount(h[i] ^ h[j]) <= max_distance``.

    If ``codes`` (e.g. integer split codes) is given, only pairs with different codes are
    returned. Returns ``(i, j, distance)`` sorted by ``(i, j)``. Needs no split column, so
    a splitter can use it to keep near copies together before assigning splits.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance must be in 0..63, got {max_distance}")
    n = len(hashes)
    found_i, found_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if n < 2:
        return found_i[0], found_j[0], np.zeros(0, np.int64)
    index_type = np.int32 if n < 2**31 else np.int64  # halves memory traffic
    for shift, width, radius in plan or _chunk_plan(n, max_distance):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable").astype(index_type)
        masks = _flip_masks(width, radius)
        if width <= _TABLE_BITS:  # direct-address bucket table: O(1) per probe
            sizes = np.bincount(keys.astype(np.int64), minlength=1 << width)
            bucket_end = np.cumsum(sizes).astype(index_type)
            bucket_start = bucket_end - sizes.astype(index_type)
        else:
            sorted_keys = keys[order]
        block = max(1, _PROBES_PER_BLOCK // n)
        for start in range(0, len(masks), block):
            block_masks = masks[start : start + block]
            probes = (keys[:, None] ^ block_masks[None, :]).ravel()
            query = np.repeat(np.arange(n, dtype=index_type), len(block_masks))
            if width <= _TABLE_BITS:
                probe_idx = probes.astype(np.int64)
                lo = bucket_start[probe_idx]
                counts = bucket_end[probe_idx] - lo
            else:
                lo = np.searchsorted(sorted_keys, probes, side="left").astype(index_type)
                counts = np.searchsorted(sorted_keys, probes, side="right").astype(index_type) - lo
            hit = counts > 0
            query, lo, counts = query[hit], lo[hit], counts[hit]
            total = int(counts.sum())
            if total == 0:
                continue
            # Expand each probe into its bucket: candidate pairs (qi, tj).
            first = np.cumsum(counts) - counts
            qi = np.repeat(query, counts)
            tj = order[np.arange(total, dtype=index_type) + np.repeat(lo - first, counts)]
            keep = np.bitwise_count(hashes[qi] ^ hashes[tj]) <= max_distance
            keep &= qi < tj  # each unordered pair once; drops self matches
            qi, tj = qi[keep], tj[keep]
            if codes is not None:
                differ = codes[qi] != codes[tj]
                qi, tj = qi[differ], tj[differ]
            found_i.append(qi.astype(np.int64))
            found_j.append(tj.astype(np.int64))
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    pair_key = np.unique(i * n + j)  # a pair may match in several chunks
    i, j = pair_key // n, pair_key % n
    distance = np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)
    return i, j, distance


# ------------------------------------------------------------------------ detectors


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise BadInputError(
            f"{what} needs column(s) {missing}; columns present: {list(df.columns)}. "
            "Run ingest_images and attach the split assignment first."
        )


def find_exact_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Items whose decoded pixels are identical to an item in another split.

    One row per offending item: ``pixel_sha256``, ``item_id``, ``split``, sorted by hash.
    """
    _require(df, ("item_id", "split", "pixel_sha256"), "find_exact_duplicates")
    splits_per_hash = df.groupby("pixel_sha256", sort=False)["split"].nunique()
    leaking = splits_per_hash.index[splits_per_hash > 1]
    out = df.loc[df["pixel_sha256"].isin(leaking), ["pixel_sha256", "item_id", "split"]]
    return out.sort_values(["pixel_sha256", "split", "item_id"]).reset_index(drop=True)


def find_near_duplicates(
    df: pd.DataFrame, max_distance: int | NearDuplicateRule = DEFAULT_MAX_DISTANCE
) -> pd.DataFrame:
    """Pairs of items in different splits that are copies of one photo.

    A pair is a candidate when the pHashes differ in <= ``max_distance`` bits (or the
    rule's ``max_distance``); when the table has a ``thumb`` column (every ingested
    table has) the candidate must also be confirmed by the thumbnails
    (:func:`roadwork_assets.core.data.similarity.confirm_pairs`), so distinct
    low-texture scenes that merely share a pHash are not reported.

    Columns ``item_id_a``, ``split_a``, ``item_id_b``, ``split_b``, ``distance``. Pairs
    with identical ``pixel_sha256`` (if that column is present) are left to
    :func:`find_exact_duplicates` so a copy is not reported twice.
    """
    rule = _as_rule(max_distance)
    _require(df, ("item_id", "split", "phash"), "find_near_duplicates")
    hashes = phash_array(df["phash"])
    split_codes = pd.factorize(df["split"])[0]
    i, j, distance = near_duplicate_pairs(hashes, rule.max_distance, codes=split_codes)
    certain = np.ones(len(i), dtype=bool)  # without thumbnails: pHash alone (legacy tables)
    if "thumb" in df.columns and len(i):
        likely, certain = confirm_pairs(thumbnail_array(df["thumb"].tolist()), i, j, rule)
        i, j, distance, certain = i[likely], j[likely], distance[likely], certain[likely]
    if "pixel_sha256" in df.columns and len(i):
        sha = df["pixel_sha256"].to_numpy()
        not_exact = sha[i] != sha[j]
        i, j, distance, certain = i[not_exact], j[not_exact], distance[not_exact], certain[not_exact]
    items, splits = df["item_id"].to_numpy(), df["split"].to_numpy()
    out = pd.DataFrame({
        "item_id_a": items[i], "split_a": splits[i],
        "item_id_b": items[j], "split_b": splits[j], "distance": distance,
        "certain": certain,
    })
    return out.sort_values(["distance", "item_id_a", "item_id_b"]).reset_index(drop=True)


def find_shared_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Items whose ``group_id`` also occurs in another split (None/NaN groups ignored).

    One row per offending item: ``group_id``, ``item_id``, ``split``, sorted by group.
    """
    _require(df, ("item_id", "split", "group_id"), "find_shared_groups")
    grouped = df[df["group_id"].notna()]
    splits_per_group = grouped.groupby("group_id", sort=False)["split"].nunique()
    leaking = splits_per_group.index[splits_per_group > 1]
    out = grouped.loc[grouped["group_id"].isin(leaking), ["group_id", "item_id", "split"]]
    return out.sort_values(["group_id", "split", "item_id"]).reset_index(drop=True)


def _as_rule(rule: int | NearDuplicateRule) -> NearDuplicateRule:
    return rule if isinstance(rule, NearDuplicateRule) else NearDuplicateRule(max_distance=int(rule))


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, eq=False)
class LeakageReport:
    """Outcome of :func:`check_split_leakage`; the tables hold every offender."""

    ok: bool
    n_items: int
    max_distance: int
    n_exact_groups: int
    n_near_pairs: int
    n_shared_groups: int
    examples: tuple[str, ...]
    n_possible_pairs: int
    exact: pd.DataFrame = field(repr=False)
    near: pd.DataFrame = field(repr=False)
    shared_groups: pd.DataFrame = field(repr=False)

    def summary(self) -> str:
        possible = (f"; {self.n_possible_pairs} possible-copy pair(s) across splits "
                    "(likely, not certain, copies; listed in the metadata)"
                    if self.n_possible_pairs else "")
        if self.ok:
            return (f"no leakage between splits among {self.n_items} items "
                    f"(exact, near <= {self.max_distance} bits confirmed by thumbnails, "
                    f"groups){possible}")
        head = (f"leakage between splits among {self.n_items} items: "
                f"{self.n_exact_groups} exact-duplicate set(s), {self.n_near_pairs} "
                f"near-duplicate pair(s) (pHash <= {self.max_distance} bits), "
                f"{self.n_shared_groups} group(s) in several splits")
        return head + ". First offenders:\n  " + "\n  ".join(self.examples)

    def raise_if_leaking(self) -> None:
        if not self.ok:
            raise LeakageError(
                self.summary() + "\nReassign these items so each copy/group lives in one "
                "split (or remove the copies), then rebuild the split manifest."
            )


def check_split_leakage(
    df: pd.DataFrame, max_distance: int | NearDuplicateRule = DEFAULT_MAX_DISTANCE, *,
    max_examples: int = 10,
) -> LeakageReport:
    """Run all three detectors; ``group_id`` may be absent (no group check then)."""
    rule = _as_rule(max_distance)
    max_distance = rule.max_distance
    exact = find_exact_duplicates(df)
    found = find_near_duplicates(df, rule)
    # Certain copies across splits are leakage. Likely-but-not-certain pairs across splits
    # exist only where the splitter refused to chain a group past max_loose_group images
    # (core.data.splits.near_duplicate_links): they are listed, not failed.
    near = found[found["certain"]].reset_index(drop=True)
    possible = found[~found["certain"]].reset_index(drop=True)
    if "group_id" in df.columns:
        shared = find_shared_groups(df)
    else:
        shared = pd.DataFrame(columns=["group_id", "item_id", "split"])

    exact_examples = [
        "exact duplicate: " + _listing(rows, " = ")
        for _, rows in _first_groups(exact, "pixel_sha256", max_examples)
    ]
    near_examples = [
        f"near duplicate ({row.distance} bits): {row.item_id_a!r} ({row.split_a}) ~ "
        f"{row.item_id_b!r} ({row.split_b})"
        for row in near.head(max_examples).itertuples(index=False)
    ]
    group_examples = [
        f"group {group!r} in several splits: " + _listing(rows, ", ")
        for group, rows in _first_groups(shared, "group_id", max_examples)
    ]
    # Interleave the kinds so a flood of one kind does not hide the others.
    examples = [e for trio in zip_longest(exact_examples, near_examples, group_examples)
                for e in trio if e is not None]

    n_exact = exact["pixel_sha256"].nunique()
    n_shared = shared["group_id"].nunique()
    return LeakageReport(
        ok=not (n_exact or len(near) or n_shared),
        n_items=len(df),
        max_distance=max_distance,
        n_exact_groups=int(n_exact),
        n_near_pairs=len(near),
        n_shared_groups=int(n_shared),
        examples=tuple(examples[:max_examples]),
        n_possible_pairs=len(possible),
        exact=exact,
        near=near,
        shared_groups=shared,
    )


def _first_groups(table: pd.DataFrame, key: str, limit: int) -> list[tuple[object, pd.DataFrame]]:
    keys = table[key].drop_duplicates().head(limit)
    return [(k, table[table[key] == k]) for k in keys]


def _listing(rows: pd.DataFrame, sep: str) -> str:
    shown = sep.join(f"{i!r} ({s})" for i, s in zip(rows["item_id"].head(_ITEMS_PER_EXAMPLE),
                                                    rows["split"].head(_ITEMS_PER_EXAMPLE)))
    hidden = len(rows) - _ITEMS_PER_EXAMPLE
    return shown + (f" (+{hidden} more)" if hidden > 0 else "")
