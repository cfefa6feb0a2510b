"""Drift of incoming unlabelled images against the val_test reference: PSI and KS.

Population stability index, binned on the reference's quantiles. With B bins whose
edges are the reference's (1/B, ..., (B-1)/B) quantiles (outer bins open), r_i and c_i
the reference and incoming shares of bin i, smoothed as (count_i + s) / (N + s B) with a
pseudo-count s (0.5, Jeffreys) so that an empty bin does not make ln(c_i / r_i) explode:

    PSI = sum_i (c_i - r_i) * ln(c_i / r_i)

Sampling noise alone makes PSI positive. For n reference and m incoming values from
one distribution, to second order PSI ~ sum_i (c_i - r_i)^2 / r_i, and each difference
has variance r_i (1 - r_i) (1/n + 1/m), so

    PSI * (1/n + 1/m)^-1  ~  chi^2(B - 1)          (approximately, under no drift)

A fixed rule of thumb (0.1 small, 0.25 large) is meaningless on 60 images, where noise
alone gives PSI ~ 9 * (1/120 + 1/60) = 0.22. The PSI limit is therefore

    psi_limit = max(psi_threshold, chi^2_{1 - alpha'}(B - 1) * (1/n + 1/m))

the configured effect size, raised to the level noise exceeds with probability alpha'
(the "noise floor"). Two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``):
D = sup_x |F_ref(x) - F_inc(x)|, drift when its p-value < alpha'.

What is compared: (1) the served score (a probability per image); (2) the embedding
summary: both projected onto the first k principal components (sklearn PCA) fitted on
reference and incoming pooled (``DriftDetector`` says why), each compared as above; the k
components are a family, so its PSI is the largest one and its KS p-value is
Bonferroni's min(1, k * min_j p_j), each against alpha / k.

Verdict: drift when any of the four (score PSI, score KS, embedding PSI, embedding KS)
exceeds its limit. Each has false-alarm rate <= alpha' = alpha / 4 per comparison
(KS exactly; PSI through the chi^2 approximation), so a no-drift batch is flagged with
probability <= alpha (union bound).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats
from sklearn.decomposition import PCA

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError

N_TESTS = 4  # score PSI, score KS, embedding PSI, embedding KS: the family alpha covers


class DriftConfig(BaseModel):
    """Thresholds of the drift verdict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    psi_threshold: float = Field(
        0.2, gt=0, description="PSI effect size counted as drift (0.1 small, 0.25 large by "
        "the usual rule); raised to the noise floor on small samples")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="false-alarm rate of the whole verdict on a batch "
        "without drift (split over the four comparisons)")
    n_bins: int = Field(10, ge=2, le=100, description="PSI bins (reference quantiles)")
    n_components: int = Field(5, ge=1, le=64, description="principal components of the "
                              "reference embeddings compared")
    min_images: int = Field(20, ge=5, description="fewest incoming (and reference) images "
                            "a verdict is given on")
    smoothing: float = Field(
        0.5, gt=0, le=1, description="pseudo-count added to every PSI bin (Jeffreys): an "
        "empty bin would otherwise make ln(c/r) explode on a small batch")


class Comparison(BaseModel):
    """One compared quantity: PSI and KS, their limits, and whether it drifted."""

    name: str
    psi: float
    psi_limit: float
    ks_statistic: float
    ks_p_value: float
    ks_alpha: float
    n_reference: int
    n_incoming: int

    @property
    def psi_drift(self) -> bool:
        return self.psi > self.psi_limit

    @property
    def ks_drift(self) -> bool:
        return self.ks_p_value < self.ks_alpha

    @property
    def drifted(self) -> bool:
        return self.psi_drift or self.ks_drift


class DriftReport(BaseModel):
    score: Comparison
    embedding: Comparison
    n_components: int
    config: DriftConfig

    @property
    def drifted(self) -> bool:
        return self.score.drifted or self.embedding.drifted

    @property
    def verdict(self) -> str:
        return "drift" if self.drifted else "no drift"

    def reasons(self) -> list[str]:
        out = []
        for c in (self.score, self.embedding):
            if c.psi_drift:
                out.append(f"{c.name} PSI {c.psi:.3f} > {c.psi_limit:.3f}")
            if c.ks_drift:
                out.append(f"{c.name} KS p {c.ks_p_value:.2g} < {c.ks_alpha:.2g} "
                           f"(D = {c.ks_statistic:.3f})")
        return out


def quantile_edges(reference: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges: the reference's quantiles, ties merged (a constant reference
    gives one edge, two bins)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, n_bins + 1)[1:-1]))


def psi(reference: np.ndarray, incoming: np.ndarray, edges: np.ndarray,
        smoothing: float = 0.5) -> float:
    """PSI of ``incoming`` against ``reference`` on the bins the inner ``edges`` make."""
    r, c = _shares(reference, edges, smoothing), _shares(incoming, edges, smoothing)
    return float(np.sum((c - r) * np.log(c / r)))


def _shares(values: np.ndarray, edges: np.ndarray, smoothing: float) -> np.ndarray:
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return (counts + smoothing) / (len(values) + smoothing * len(counts))


def psi_noise_floor(n_bins: int, n_reference: int, n_incoming: int, alpha: float) -> float:
    """The PSI that sampling noise alone exceeds with probability ~alpha (module doc)."""
    return float(stats.chi2.ppf(1 - alpha, max(n_bins - 1, 1))
                 * (1 / n_reference + 1 / n_incoming))


def _finite(name: str, values: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise BadInputError(f"drift: {name} must be {ndim}-dimensional, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
    if len(bad):
        raise BadInputError(f"drift: {name} has {len(bad)} row(s) with NaN/inf (first: row "
                            f"{int(bad[0])}); re-score those images")
    return arr


class DriftDetector:
    """Fit on the reference (scores [n], embeddings [n, d]); ``compare`` incoming ones.

    Learned state: ``score_reference_``, ``score_edges_`` (inner PSI edges),
    ``embedding_reference_`` ([n, d]). The principal components are fitted at ``compare``
    on reference and incoming pooled: components fitted on the reference alone overfit it
    (their in-sample variance is inflated, which KS reads as drift on every batch), while
    pooled ones treat both samples alike, so under no drift the labels stay exchangeable
    and the KS p-values stay valid.
    """

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config or DriftConfig()

    def fit(self, scores: np.ndarray, embeddings: np.ndarray) -> DriftDetector:
        scores = _finite("reference scores", scores, 1)
        embeddings = _finite("reference embeddings", embeddings, 2)
        if len(scores) != len(embeddings):
            raise BadInputError(f"drift: {len(scores)} reference scores but "
                                f"{len(embeddings)} reference embeddings")
        if len(scores) < self.config.min_images:
            raise InsufficientDataError(
                f"drift: the reference (val_test) has {len(scores)} images, fewer than "
                f"min_images = {self.config.min_images}; use a larger val_test or lower it")
        self.score_reference_ = scores
        self.score_edges_ = quantile_edges(scores, self.config.n_bins)
        self.embedding_reference_ = embeddings
        return self

    def compare(self, scores: np.ndarray, embeddings: np.ndarray) -> DriftReport:
        cfg = self.config
        scores = _finite("incoming scores", scores, 1)
        embeddings = _finite("incoming embeddings", embeddings, 2)
        if len(scores) != len(embeddings):
            raise BadInputError(f"drift: {len(scores)} incoming scores but "
                                f"{len(embeddings)} incoming embeddings")
        if embeddings.shape[1] != self.embedding_reference_.shape[1]:
            raise BadInputError(
                f"drift: incoming embeddings have {embeddings.shape[1]} dimensions, the "
                f"reference {self.embedding_reference_.shape[1]}: score both with the same "
                "model")
        if len(scores) < cfg.min_images:
            raise InsufficientDataError(
                f"drift: {len(scores)} incoming images, fewer than min_images = "
                f"{cfg.min_images}; wait for more or lower drift min_images")
        alpha = cfg.alpha / N_TESTS
        n, m = len(self.score_reference_), len(scores)
        ks = stats.ks_2samp(self.score_reference_, scores)
        score = Comparison(
            name="score", psi=psi(self.score_reference_, scores, self.score_edges_, cfg.smoothing),
            psi_limit=max(cfg.psi_threshold, psi_noise_floor(cfg.n_bins, n, m, alpha)),
            ks_statistic=float(ks.statistic), ks_p_value=float(ks.pvalue), ks_alpha=alpha,
            n_reference=n, n_incoming=m)
        embedding, k = self._embedding(embeddings, alpha)
        return DriftReport(score=score, embedding=embedding, n_components=k, config=cfg)

    def _embedding(self, embeddings: np.ndarray, alpha: float) -> tuple[Comparison, int]:
        """The component family: largest PSI, Bonferroni KS, limits at alpha / k."""
        cfg = self.config
        ref_emb = self.embedding_reference_
        n, m = len(ref_emb), len(embeddings)
        k = int(min(cfg.n_components, ref_emb.shape[1], n + m - 1))
        pca = PCA(n_components=k, random_state=0).fit(np.vstack([ref_emb, embeddings]))
        ref, inc = pca.transform(ref_emb), pca.transform(embeddings)
        psis, tests = [], []
        for j in range(k):
            psis.append(psi(ref[:, j], inc[:, j], quantile_edges(ref[:, j], cfg.n_bins),
                            cfg.smoothing))
            tests.append(stats.ks_2samp(ref[:, j], inc[:, j]))
        worst = int(np.argmin([t.pvalue for t in tests]))
        return Comparison(
            name=f"embedding (PCA {k})", psi=float(max(psis)),
            psi_limit=max(cfg.psi_threshold, psi_noise_floor(cfg.n_bins, n, m, alpha / k)),
            ks_statistic=float(tests[worst].statistic),
            ks_p_value=float(min(1.0, k * tests[worst].pvalue)), ks_alpha=alpha,
            n_reference=n, n_incoming=m), k
