"""Score shift between val_calib and val_test: is the FNR guarantee's assumption intact?

The policy's guarantee (CRC / LTT) assumes the images it is applied to are exchangeable
with val_calib. Evaluation may read val_test only, so the policy stores a compact
reference of its own scores (`score_reference`, built here at fit time from the
threshold part of val_calib) and the test report compares val_test's scores with it by a
two-sample Kolmogorov-Smirnov test per class.

Why per class: the FNR guarantee is about roadwork images only, so the positives' test
is the one that speaks to it; a shift among the negatives moves the FPR and defer rate;
a shift of the pooled scores with neither class shifted is a change in class balance
(label shift), which the class-conditional FNR guarantee survives.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import ks_2samp

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.contracts.schemas import KsTest, ScoreReference, ScoreShift
from roadwork_assets.core.calibration.calibrators import as_binary_labels

SHIFT_LEVEL = 0.01  # p below this on a class's KS test: that class's scores shifted
MAX_REFERENCE_POINTS = 4000  # above this, keep every stride-th order statistic


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if p.shape != y.shape:
        raise BadInputError(f"{p.size} scores for {y.size} labels")
    if not np.isfinite(p).all():
        raise BadInputError(f"scores hold NaN/inf at rows {np.flatnonzero(~np.isfinite(p))[:10].tolist()}")
    return p, as_binary_labels(y, p.size, dtype=np.int64)


def score_reference(scores, labels, max_points: int = MAX_REFERENCE_POINTS) -> ScoreReference:
    """Sorted scores per class (all of them, or evenly thinned order statistics)."""
    p, y = _scores_labels(scores, labels)
    stride = max(1, int(np.ceil(p.size / max_points)))
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    # centred order statistics: the (stride/2)-th, then every stride-th
    start = stride // 2
    return ScoreReference(
        n_positive=int(pos.size), n_negative=int(neg.size), stride=stride,
        positives=pos[start::stride].tolist(), negatives=neg[start::stride].tolist(),
    )


def _ks(group: str, ref: np.ndarray, test: np.ndarray, level: float) -> KsTest:
    if ref.size == 0 or test.size == 0:
        return KsTest(group=group, n_reference=int(ref.size), n_test=int(test.size))
    res = ks_2samp(ref, test, alternative="two-sided", method="auto")
    p_value = float(res.pvalue)
    return KsTest(
        group=group, n_reference=int(ref.size), n_test=int(test.size),
        statistic=float(res.statistic), p_value=p_value,
        reference_median=float(np.median(ref)), test_median=float(np.median(test)),
        shifted=p_value < level,
    )


def _describe(t: KsTest) -> str:
    side = "lower" if t.test_median < t.reference_median else "higher"
    return (f"{t.group}: KS D = {t.statistic:.3f}, p = {t.p_value:.2g} (val_test n = {t.n_test}, "
            f"median {t.test_median:.3f}, {side} than val_calib's {t.reference_median:.3f}, "
            f"n = {t.n_reference})")


def compare_to_reference(reference: ScoreReference, scores, labels,
                         level: float = SHIFT_LEVEL) -> ScoreShift:
    """KS tests of val_test scores vs the reference: positives, negatives, all."""
    p, y = _scores_labels(scores, labels)
    ref_pos, ref_neg = np.asarray(reference.positives), np.asarray(reference.negatives)
    tests = {
        "positives": _ks("positives", ref_pos, p[y == 1], level),
        "negatives": _ks("negatives", ref_neg, p[y == 0], level),
        "all": _ks("all", np.concatenate([ref_pos, ref_neg]), p, level),
    }
    pos, neg, both = tests["positives"], tests["negatives"], tests["all"]
    parts: list[str] = []
    if pos.shifted:
        parts.append(
            f"Roadwork scores on val_test differ from val_calib ({_describe(pos)}). The FNR "
            "guarantee assumes val_test (and deployment) images are exchangeable with "
            "val_calib; this looks violated, so the guaranteed miss rate may not hold here"
            + (" — val_test roadwork scores lower, which raises misses." if
               pos.test_median < pos.reference_median else ".")
        )
    if neg.shifted:
        parts.append(f"Non-roadwork scores differ too ({_describe(neg)}): false-positive "
                     "and defer rates measured on val_calib will not carry over.")
    warning = None
    if parts:
        warning = ("Score shift between val_calib and val_test at level "
                   f"{level:g}. " + " ".join(parts) + " Re-fit the policy on calibration "
                   "data drawn like val_test, or find what changed (source, camera, season, "
                   "labelling) before trusting the guarantee.")
    note = None
    if both.shifted and not parts:
        note = (f"Pooled scores differ ({_describe(both)}) but neither class does: the class "
                "balance changed (label shift); the FNR guarantee, conditional on roadwork, "
                "is unaffected.")
    return ScoreShift(level=level, reference_stride=reference.stride,
                      tests=list(tests.values()), warning=warning, note=note)
