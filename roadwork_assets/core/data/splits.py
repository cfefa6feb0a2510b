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

from dataclasses import dataclass

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.data.similarity import (
    NearDuplicateRule,
    confirm_pairs,
    thumbnail_array,
)
from roadwork_assets.core.hashing import unit_hash
from roadwork_assets.core.progress import Progress, no_progress

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


def near_duplicate_links(
    frame: pd.DataFrame, rule: NearDuplicateRule, base: pd.Series | None = None,
    progress: Progress = no_progress,
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of ``frame`` rows joined as copies of one photo.

    A candidate (pHash within ``rule.max_distance``) is a link only when the stored
    thumbnails confirm it (``core.data.similarity``): pHash alone never links, so
    low-texture or dark scenes that share a layout fingerprint stay apart. Chaining is
    bounded: links of likely copies (residual <= ``max_residual``) may join at most
    ``max_loose_group`` units (scenes with a group id, or distinct photos); a component
    larger than that keeps only its certain links (residual <= ``certain_residual``). A handful of rare false "likely" links
    among thousands of look-alike scenes therefore cannot snowball into one giant group.
    """
    from roadwork_assets.core.data.dedup import near_duplicate_pairs, phash_array

    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if "phash" not in frame or len(frame) < 2:
        return none
    if "thumb" not in frame:
        raise BadInputError(
            "near-duplicate merging needs the 'thumb' column that source_images writes "
            "(a pHash match alone is not proof of a copy); re-materialize source_images, "
            "or pass near_duplicate_distance=None to split on group keys only"
        )
    i, j, _ = near_duplicate_pairs(phash_array(frame["phash"]), rule.max_distance)
    likely, certain = confirm_pairs(thumbnail_array(frame["thumb"].tolist()), i, j, rule,
                                    progress)
    i, j, certain = i[likely], j[likely], certain[likely]
    if len(i) == 0:
        return none
    if base is None:
        base = group_keys(frame).astype(str).reset_index(drop=True)
    comp = _components(base, i, j)
    # size in units (a scene with a group id, or one photo's pixels), not images: a scene of
    # 50 frames is one unit, and a likely copy of one of its frames must still join it
    units = pd.Series(np.asarray(base)).groupby(comp).nunique().to_numpy()
    big = units[comp] > rule.max_loose_group  # per image: in an oversize component
    keep = ~big[i] | certain
    return i[keep], j[keep]


def _components(base: pd.Series, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components over shared base keys and confirmed links."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    codes, _ = pd.factorize(base)
    n = len(base)
    rows = np.concatenate([i, np.arange(n)])
    cols = np.concatenate([j, n + codes])
    size = n + (codes.max() + 1 if n else 0)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    return connected_components(graph, directed=False)[1][:n]


@dataclass(frozen=True, eq=False)
class SplitResult:
    """What :func:`split_images` decided.

    ``assignment``: the input rows sorted by item_id with ``group_key`` and ``split``.
    ``held_out``: new images left out of every split (``item_id``, ``uri``, ``reason``):
    near-copies of images that already sit in two different splits, which no split
    can take without leaking. ``n_kept_from_previous``: images whose split came from
    the previous assignment.
    """

    assignment: pd.DataFrame
    held_out: pd.DataFrame
    n_kept_from_previous: int
    previous_note: str | None = None


def split_images(
    frame: pd.DataFrame,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    rule: NearDuplicateRule | None = None,
    previous: pd.DataFrame | None = None,
    progress: Progress = no_progress,
    holdout_source: str | None = None,
) -> SplitResult:
    """Assign every image a split; copies of one photo and one group share a split.

    Units: images sharing a group id (else identical pixels) share a base key; with a
    ``rule``, confirmed near-copies (:func:`near_duplicate_links`) join their
    components. A component's split is

    - the split its members already had in ``previous`` (the last promoted assignment,
      matched by decoded-pixel sha256), so adding images never moves an existing image
      and removing images never moves the rest, near-copies included;
    - for a component with no previous member: the bucket of the cumulative fractions
      that u = sha256(seed, key) falls into, key = the smallest base key among its
      members (a pure function of the data, so a fresh run is reproducible).

    A new image linked to previous images in two different splits is held out (see
    :class:`SplitResult`); the previous images keep their splits. ``previous`` must come
    from the same fractions, seed, rule and holdout source; the caller checks that.

    ``holdout_source`` (a cross-source evaluation: train on the others, test on it): every
    component with a member from that source goes to val_test whole -- copies of its
    photos in other sources included, so no copy of a test photo is trained on. Every
    other component is hashed over train / val_select / val_calib with their fractions
    renormalised (val_test's share spread over them), so val_test holds the held-out
    source only (plus those copies). A new held-out image whose copy already sits in
    another split is held out of every split (the existing image never moves).
    """
    fr = validate_fractions(fractions or DEFAULT_FRACTIONS)
    missing = {"item_id", "label", "pixel_sha256"} - set(frame.columns)
    if missing:
        raise BadInputError(f"cannot assign splits: missing columns {sorted(missing)}")
    out = frame.sort_values("item_id", kind="stable").reset_index(drop=True).copy()
    base = group_keys(out).astype(str).reset_index(drop=True)
    i, j = (near_duplicate_links(out, rule, base, progress) if rule is not None
            else (np.zeros(0, np.int64),) * 2)
    comp = _components(base, i, j) if len(out) else np.zeros(0, np.int64)

    previous, note = _consistent_previous(out, previous)
    prev_split, prev_key = _previous_of(out, previous)
    has_prev = prev_split.notna().to_numpy()

    table = pd.DataFrame({"comp": comp, "base": base, "prev_split": prev_split,
                          "prev_key": prev_key})
    fresh_key = table.groupby("comp")["base"].transform("min")
    prior = table[has_prev].groupby("comp")
    comp_split = prior["prev_split"].first()
    comp_key = prior["prev_key"].min()
    forced = _holdout_components(out, comp, holdout_source)
    n_splits_here = _prior_splits(prior, comp, forced)

    key = fresh_key.to_numpy(dtype=object).copy()
    split = np.empty(len(out), dtype=object)
    single = n_splits_here == 1
    key[single] = comp_key.reindex(comp[single]).to_numpy()
    split[single] = comp_split.reindex(comp[single]).to_numpy()
    # conflicting components: previous images keep exactly what they had
    conflict = n_splits_here > 1
    keep_prev = conflict & has_prev
    key[keep_prev] = prev_key.to_numpy()[keep_prev]
    split[keep_prev] = prev_split.to_numpy()[keep_prev]
    held = conflict & ~has_prev

    fresh = n_splits_here == 0
    if fresh.any():
        split[fresh] = _hash_splits(key[fresh], fr, seed, holdout=holdout_source is not None)
    split[fresh & forced] = "val_test"

    out["group_key"] = key
    out["split"] = split
    held_rows = _held_out_rows(out, held, comp, table[has_prev])
    assignment = out.loc[~held].reset_index(drop=True)
    return SplitResult(assignment, held_rows, int(has_prev.sum()), note)


def _prior_splits(prior, comp: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Per row: in how many splits its component's previous members are (0: none). A
    held-out source's component belongs in val_test and nowhere else, so one with a
    previous member outside val_test counts as a conflict (2); a clash-free one's previous
    members are all in val_test already."""
    if not len(comp):
        return np.zeros(0, dtype=int)
    here = prior["prev_split"].nunique().reindex(range(comp.max() + 1), fill_value=0) \
        .to_numpy()[comp]
    if forced.any():
        elsewhere = prior["prev_split"].agg(lambda v: bool(set(v) - {"val_test"}))
        clash = elsewhere.reindex(comp, fill_value=False).to_numpy() & forced
        here = np.where(clash, 2, here)
    return here


def _consistent_previous(out: pd.DataFrame, previous: pd.DataFrame | None
                         ) -> tuple[pd.DataFrame | None, str | None]:
    """``previous`` if every image in both carries the same group id as before, else None.

    A corrected group id changes which images must share a split; keeping the old splits
    of some members would put one scene in two splits, so the whole split starts over.
    """
    if previous is None or not len(previous) or "group_id" not in previous.columns:
        return previous, None
    def gid(frame: pd.DataFrame) -> pd.Series:
        return frame.drop_duplicates("pixel_sha256").set_index("pixel_sha256")["group_id"] \
            .astype("string").fillna("")

    now = gid(out) if "group_id" in out.columns else pd.Series("", index=out["pixel_sha256"])
    before = gid(previous)
    both = now.index.intersection(before.index)
    changed = both[(now.reindex(both) != before.reindex(both)).to_numpy()]
    if len(changed) == 0:
        return previous, None
    return None, (f"the group ids of {len(changed)} image(s) changed since the previous split "
                  "assignment: re-splitting from scratch, so existing images may move between "
                  "splits (keeping their old splits would put one scene in two splits)")


def _previous_of(out: pd.DataFrame, previous: pd.DataFrame | None) -> tuple[pd.Series, pd.Series]:
    """Each row's split and group key in the previous assignment (None when new)."""
    none = pd.Series([None] * len(out), dtype=object)
    if previous is None or not len(previous):
        return none, none.copy()
    need = {"pixel_sha256", "split", "group_key"} - set(previous.columns)
    if need:
        raise BadInputError(f"previous split assignment lacks column(s) {sorted(need)}; "
                            "delete it to re-split from scratch")
    by_sha = previous.drop_duplicates("pixel_sha256").set_index("pixel_sha256")
    return (out["pixel_sha256"].map(by_sha["split"]).astype(object),
            out["pixel_sha256"].map(by_sha["group_key"]).astype(object))


def _hash_splits(keys: np.ndarray, fractions: dict[str, float], seed: int,
                 holdout: bool = False) -> np.ndarray:
    """The bucket of the cumulative fractions that u = sha256(seed, key) falls into
    (``holdout``: val_test's fraction spread over the other splits, see
    :func:`hashed_fractions`)."""
    fractions = hashed_fractions(fractions, holdout)
    names = [s for s in SPLITS if fractions[s] > 0]
    uniq = pd.unique(keys)
    u = pd.Series(unit_hash(f"{seed}\x00{k}" for k in uniq), index=uniq)
    edges = np.cumsum([fractions[s] for s in names])
    edges[-1] = 1.0 + 1e-12
    return np.asarray(names, dtype=object)[
        np.searchsorted(edges, u.reindex(keys).to_numpy(), side="right")]


def hashed_fractions(fractions: dict[str, float], holdout: bool) -> dict[str, float]:
    """The fractions the hash split uses: the configured ones, or with a held-out source
    val_test 0 and the others renormalised (val_test is the held-out source)."""
    if not holdout:
        return dict(fractions)
    rest = sum(v for k, v in fractions.items() if k != "val_test")
    return {k: (0.0 if k == "val_test" else v / rest) for k, v in fractions.items()}


def _holdout_components(out: pd.DataFrame, comp: np.ndarray, holdout_source: str | None
                        ) -> np.ndarray:
    """Per row: its component holds an image of ``holdout_source``."""
    if holdout_source is None or not len(out):
        return np.zeros(len(out), dtype=bool)
    if "source" not in out.columns or not (out["source"] == holdout_source).any():
        found = sorted(out["source"].unique()) if "source" in out.columns else []
        raise BadInputError(
            f"dataset.holdout_source = {holdout_source!r} names no source with images; the "
            f"sources are {found}: set it to one of them, or unset it")
    hit = np.zeros(comp.max() + 1, dtype=bool)
    hit[comp[(out["source"] == holdout_source).to_numpy()]] = True
    if hit[comp].all():
        raise BadInputError(
            f"dataset.holdout_source = {holdout_source!r} would put every image in val_test "
            "(it is the only source, or every photo has a copy in it): name a second source "
            "in ROADWORK_DATA to train on, or unset dataset.holdout_source")
    return hit[comp]


def _held_out_rows(out: pd.DataFrame, held: np.ndarray, comp: np.ndarray,
                   prior: pd.DataFrame) -> pd.DataFrame:
    rows = out.loc[held, [c for c in ("item_id", "uri") if c in out.columns]].copy()
    if not len(rows):
        rows["reason"] = pd.Series(dtype=object)
        return rows.reset_index(drop=True)
    splits_of = prior.groupby("comp")["prev_split"].agg(lambda v: sorted(set(v)))
    rows["reason"] = [
        f"{item!r} is a near-copy of images already in splits {splits_of[c]}; no split can "
        "take it without leaking. Remove the copy, or give it the group id of the scene "
        "it belongs to"
        for item, c in zip(rows["item_id"], comp[held])]
    return rows.reset_index(drop=True)


def assign_splits(
    frame: pd.DataFrame,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    near_duplicate_distance: int | None = None,
    *,
    rule: NearDuplicateRule | None = None,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """:func:`split_images`' assignment. ``near_duplicate_distance`` is shorthand for
    ``rule=NearDuplicateRule(max_distance=...)``; None (and no rule) splits on group keys only."""
    if rule is None and near_duplicate_distance is not None:
        rule = NearDuplicateRule(max_distance=near_duplicate_distance)
    return split_images(frame, fractions, seed, rule, previous).assignment


def split_counts(assignment: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{split: {"n": .., "positive": .., "negative": ..}} for metadata."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        part = assignment[assignment["split"] == split]
        pos = int((part["label"] == 1).sum())
        counts[split] = {"n": len(part), "positive": pos, "negative": int(len(part) - pos)}
    return counts


def check_split_sizes(assignment: pd.DataFrame) -> None:
    """Refuse empty or one-class splits. (Whether val_calib can carry the exit policy's
    guarantee is core.calibration.policies.check_calibration_capacity: it needs the
    policy's settings and the same by-group split the policy will make.)"""
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


@dataclass(frozen=True, eq=False)
class SplitShapeReport:
    """Does the realised split look like the configured one? See :func:`split_shape_report`."""

    ok: bool
    realised: dict[str, float]
    configured: dict[str, float]
    tolerance: dict[str, float]
    max_group_images: int
    largest_groups: pd.DataFrame
    problems: tuple[str, ...]

    def summary(self) -> str:
        shares = ", ".join(f"{s} {self.realised[s]:.3f} (configured {self.configured[s]:.2f} "
                           f"+- {self.tolerance[s]:.3f})" for s in self.realised)
        if self.ok:
            top = self.largest_groups.head(1)
            biggest = (f"; largest group {top['group_key'].iloc[0]!r} has {top['n_images'].iloc[0]} "
                       f"images (cap {self.max_group_images})" if len(top) else "")
            return f"split shape ok: {shares}{biggest}"
        return "split shape wrong: " + " ".join(self.problems) + f" Realised shares: {shares}."


def split_shape_report(
    assignment: pd.DataFrame,
    fractions: dict[str, float] | None = None,
    max_group_share: float = 0.01,
    *,
    z: float = 4.0,
    min_group_cap: int = 4,
    top: int = 10,
    holdout_source: str | None = None,
) -> SplitShapeReport:
    """Check the realised split fractions and the largest group.

    Each group lands in split s with probability p_s independently, so the realised
    image share of s has variance p_s (1 - p_s) sum_g n_g^2 / N^2 (groups of sizes n_g,
    N images): the binomial variance, inflated by the group sizes. A share further than
    ``z`` standard errors from p_s (z = 4: a false alarm per split of 6e-5) means the
    assignment is not the hash split it claims to be, or one group dominates.

    No group may hold more than ``max(ceil(max_group_share * N), min_group_cap)`` images:
    a giant group is almost always a near-duplicate rule or a group id gone wrong, and
    it alone decides the make-up of whichever split it lands in.

    ``holdout_source``: groups holding an image of that source are val_test by rule, not
    by hash, so the fractions are checked on the other groups only, against the
    renormalised fractions :func:`split_images` hashed them with (val_test 0: any other
    group in val_test is a problem). The group-size cap still counts every image.
    """
    fr = hashed_fractions(validate_fractions(fractions or DEFAULT_FRACTIONS),
                          holdout_source is not None)
    n_all = len(assignment)
    hashed = assignment
    if holdout_source is not None and "source" in assignment.columns:
        ruled = assignment.loc[assignment["source"] == holdout_source, "group_key"]
        hashed = assignment[~assignment["group_key"].isin(ruled)]
    n = len(hashed)
    grouped = assignment.assign(_pos=(assignment["label"] == 1)).groupby("group_key", sort=False)
    sizes = grouped.agg(n_images=("item_id", "size"), split=("split", "first"),
                        n_positive=("_pos", "sum")).reset_index()
    sizes = sizes.sort_values(["n_images", "group_key"], ascending=[False, True])
    sizes["share"] = sizes["n_images"] / max(n_all, 1)
    cap = max(int(np.ceil(max_group_share * n_all)), min_group_cap)
    shown = sizes.head(max(top, 3)).copy()
    members = assignment[assignment["group_key"].isin(shown["group_key"])]
    first_ids = members.sort_values("item_id").groupby("group_key")["item_id"].agg(
        lambda v: ", ".join(map(str, v.head(5))))
    shown["examples"] = shown["group_key"].map(first_ids)
    hashed_sizes = sizes[sizes["group_key"].isin(hashed["group_key"])]
    sum_sq = float((hashed_sizes["n_images"].astype(np.float64) ** 2).sum())
    realised, tol, problems = {}, {}, []
    for s in SPLITS:
        p = fr[s]
        realised[s] = float((hashed["split"] == s).mean()) if n else 0.0
        tol[s] = z * float(np.sqrt(p * (1 - p) * sum_sq)) / max(n, 1)
        if abs(realised[s] - p) > tol[s]:
            problems.append(
                f"split {s!r} holds {realised[s]:.3f} of the images, configured {p:.2f} "
                f"(tolerance +- {tol[s]:.3f}, {z:g} standard errors).")
    big = shown[shown["n_images"] > cap]
    for row in big.head(3).itertuples(index=False):
        problems.append(
            f"group {row.group_key!r} has {row.n_images} images ({row.share:.1%} of {n_all}; cap "
            f"{cap} = {max_group_share:.1%}), in {row.split}, e.g. {row.examples}.")
    if (sizes["n_images"] > cap).any():
        problems.append(
            "A group this large is usually distinct scenes joined by a group id or by the "
            "near-duplicate rule: check the group ids of these images, lower "
            "dataset.near_duplicate_distance, or raise dataset.max_group_share if one scene "
            "really has this many images.")
    elif problems:
        problems.append("Check dataset.split_fractions, or re-split from scratch by deleting "
                        "the previous split assignment under ROADWORK_HOME.")
    return SplitShapeReport(
        ok=not problems, realised=realised, configured=fr, tolerance=tol,
        max_group_images=cap, largest_groups=shown.head(top).reset_index(drop=True),
        problems=tuple(problems),
    )
