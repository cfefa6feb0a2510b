"""Uncertainty signals as error detectors, and the rule that decides which a gate uses.

With one binary probability, max-prob, margin, entropy and Gini rank images the same
(docs/domain.md): a signal is worth a gate column only if it ranks *wrong* decisions
above right ones better than max-prob does. Here each signal is scored by the AUROC of
error detection (signal high = predicted wrong) and compared with max-prob on the same
images by a paired bootstrap; the documented rule (`select_signals`) keeps a signal iff
the lower end of its (1 - level) interval for AUROC(signal) - AUROC(max-prob) is > 0.

Signals (`uncertainty_signals`), all "higher = less sure", from the [N, V, 2] logits of
one split and optional extra arrays stored next to them:
- ``max_prob``: 1 - max softmax probability of the main view (the baseline);
- ``view_disagreement``: std across test-time views of P(roadwork);
- ``evidential_u``: K / S of a Dirichlet head (logits = log alpha), Sensoy et al. 2018;
- ``mc_dropout_var``: variance of P(roadwork) over T passes with dropout on.
Run this on the val_calib *fit* part only: thresholds are certified on the other part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata

BASELINE = "max_prob"


def error_detection_auroc(signal: Any, wrong: Any) -> float:
    """P(signal of a wrong decision > signal of a right one), ties count 1/2
    (Mann-Whitney); NaN unless both right and wrong decisions are present."""
    s = np.asarray(signal, dtype=np.float64).ravel()
    w = np.asarray(wrong).ravel().astype(bool)
    n1, n0 = int(w.sum()), int((~w).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[w].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def uncertainty_signals(view_logits: Any, *, main_view: int = 0, evidential: bool = False,
                        mc_dropout_var: Any = None) -> dict[str, np.ndarray]:
    """name -> [N] signal (higher = less sure). ``evidential_u`` only for an evidential
    head (for a softmax head exp(logits) is not evidence); ``mc_dropout_var`` only when given."""
    v = np.asarray(view_logits, dtype=np.float64)
    z = v[:, :, 1] - v[:, :, 0]
    p = expit(z)
    p0 = p[:, main_view]
    out = {BASELINE: 1.0 - np.maximum(p0, 1.0 - p0)}
    if v.shape[1] > 1:
        out["view_disagreement"] = p.std(axis=1)
    if evidential:
        out["evidential_u"] = v.shape[2] / np.exp(v[:, main_view]).sum(axis=1)
    if mc_dropout_var is not None:
        out["mc_dropout_var"] = np.asarray(mc_dropout_var, dtype=np.float64).ravel()
    return out


@dataclass(frozen=True)
class SignalScore:
    name: str
    auroc: float
    baseline_auroc: float
    gain: float  # auroc - baseline_auroc
    gain_low: float
    gain_high: float
    level: float

    @property
    def helps(self) -> bool:
        """The documented rule: the whole interval of the AUROC gain is above 0."""
        return bool(self.gain_low > 0)


def score_signal(name: str, signal: Any, baseline: Any, wrong: Any, *, n_boot: int = 1000,
                 level: float = 0.9, seed: int = 0) -> SignalScore:
    """AUROC gain over the baseline with a paired percentile-bootstrap interval
    (the same resampled images for both signals)."""
    s = np.asarray(signal, dtype=np.float64).ravel()
    b = np.asarray(baseline, dtype=np.float64).ravel()
    w = np.asarray(wrong).ravel().astype(bool)
    a_s, a_b = error_detection_auroc(s, w), error_detection_auroc(b, w)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(n_boot):
        i = rng.integers(0, w.size, w.size)
        g = error_detection_auroc(s[i], w[i]) - error_detection_auroc(b[i], w[i])
        if np.isfinite(g):
            gains.append(g)
    tail = (1.0 - level) / 2
    lo, hi = (np.quantile(gains, [tail, 1 - tail]) if gains else (np.nan, np.nan))
    return SignalScore(name, a_s, a_b, a_s - a_b, float(lo), float(hi), level)


def select_signals(signals: Mapping[str, Any], wrong: Any, *, n_boot: int = 1000,
                   level: float = 0.9, seed: int = 0) -> tuple[list[str], list[SignalScore]]:
    """(names of the signals that help, every signal's score) against ``max_prob``."""
    base = signals[BASELINE]
    scores = [score_signal(name, sig, base, wrong, n_boot=n_boot, level=level, seed=seed)
              for name, sig in signals.items() if name != BASELINE]
    return [s.name for s in scores if s.helps], scores
