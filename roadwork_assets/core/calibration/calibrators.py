"""Post-hoc binary calibrators: fit on held-out logits, map scores to P(roadwork).

Every calibrator here is monotone (non-decreasing) in the logit margin z = z1 - z0
(class-wise temperature: non-decreasing in z1, non-increasing in z0), so it never
reorders images; it only moves the probabilities. Parametric ones are fitted by
minimising the mean negative log-likelihood with L-BFGS-B (convex problems, unique
optimum); nesting TS ⊂ Platt ⊂ Beta is used as a warm start so that, numerically
too, NLL_Beta <= NLL_Platt <= NLL_TS on the fit set.

Inputs (`scores`): either [N, 2] two-class logits (single-score methods use the
margin z = z1 - z0) or [N] margins. Outputs: p1 = P(y = 1) as float64 [N].

Formulas (docs/domain.md, "Calibration and risk control"):
  temperature            q = σ(z / T)
  classwise_temperature  q = σ(z1 / T1 - z0 / T0)        (needs [N, 2] logits)
  platt                  q = σ(a z + b)
  beta (Kull 2017)       logit q = c + a ln s - b ln(1 - s),  s = σ(z),  a, b >= 0
  isotonic               step-wise linear interpolation of sklearn's IsotonicRegression
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.isotonic import IsotonicRegression
from threadpoolctl import ThreadpoolController

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError

# Inverse temperatures are kept strictly positive: a non-positive one would
# reverse or flatten the ranking, which a calibrator must never do.
_MIN_INV_TEMPERATURE = 1e-8
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-11}
_THREADPOOLS: ThreadpoolController | None = None


def _single_threaded_blas():
    # L-BFGS-B's own linear algebra is on <= 3x3 matrices: OpenBLAS threads only add
    # overhead there (measured 100 ms vs 5 ms per policy fit on a busy 2-core machine).
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS.limit(limits=1, user_api="blas")


# --------------------------------------------------------------------------- inputs
def as_margin(scores: Any) -> np.ndarray:
    """Return the logit margin z = z1 - z0 [N] from [N, 2] logits, or [N] margins as is."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:
        z = s[:, 1] - s[:, 0]
    elif s.ndim == 1:
        z = s
    else:
        raise BadInputError(
            f"calibrator scores must be [N, 2] two-class logits or [N] margins; got shape {s.shape}"
        )
    if not np.all(np.isfinite(z)):
        raise BadInputError(
            f"calibrator scores contain {int(np.sum(~np.isfinite(z)))} non-finite values (NaN/inf); "
            "check the logits that produced them"
        )
    return z


def as_two_class_logits(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 2:
        raise BadInputError(
            "classwise_temperature needs [N, 2] two-class logits (it scales z1 and z0 "
            f"separately); got shape {s.shape}"
        )
    if not np.all(np.isfinite(s)):
        raise BadInputError("calibrator logits contain non-finite values (NaN/inf)")
    return s


def as_binary_labels(y: Any, n: int, dtype: Any = np.float64) -> np.ndarray:
    """Labels [n] of 0 (none) / 1 (roadwork) as `dtype` (float64: logistic targets; the
    policy code asks for int64); refuse any other shape or value. The one label check of
    core.calibration."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise BadInputError(f"labels must have shape ({n},) to match the scores; got {y.shape}")
    if not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise BadInputError(f"labels must be 0 (none) or 1 (roadwork); found {bad.tolist()}")
    return y.astype(dtype)


# ------------------------------------------------------------------ logistic fitting
def mean_logistic_nll(logit: np.ndarray, target: np.ndarray) -> float:
    """Mean binary NLL of targets in [0, 1] under q = σ(logit), computed stably."""
    return float(np.mean(np.logaddexp(0.0, logit) - target * logit))


def _fit_logistic(
    features: np.ndarray,
    target: np.ndarray,
    x0: np.ndarray,
    bounds: list[tuple[float | None, float | None]] | None = None,
) -> np.ndarray:
    """Minimise mean NLL of σ(features @ w) over w (convex), L-BFGS-B with exact gradient."""
    n = features.shape[0]

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        logit = features @ w
        loss = np.mean(np.logaddexp(0.0, logit) - target * logit)
        grad = features.T @ (expit(logit) - target) / n
        return float(loss), grad

    with _single_threaded_blas():
        res = minimize(
            loss_grad,
            np.asarray(x0, dtype=np.float64),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options=_LBFGS_OPTIONS,
        )
    # L-BFGS-B only ever decreases the loss from x0, so a warm start from a nested
    # model keeps the nesting inequality even when it stops early ("ABNORMAL" line
    # searches at machine precision are harmless here).
    return np.asarray(res.x, dtype=np.float64)


# ------------------------------------------------------------------------ base class
class Calibrator:
    """Common API: fit(scores, y) -> self, predict_proba(scores) -> p1 [N], to/from params."""

    method: ClassVar[str] = ""
    _param_names: ClassVar[tuple[str, ...]] = ()

    def fit(self, scores: Any, y: Any) -> Calibrator:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, scores: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_fitted(self) -> None:
        missing = [k for k in self._param_names if not hasattr(self, k + "_")]
        if missing:
            raise BadInputError(f"{type(self).__name__} is not fitted yet: call fit(scores, y) first")

    def to_params(self) -> dict[str, Any]:
        """JSON-able {"method": name, "params": {...}} that `calibrator_from_params` rebuilds."""
        self._check_fitted()
        params: dict[str, Any] = {}
        for k in self._param_names:
            v = getattr(self, k + "_")
            params[k] = [float(x) for x in v] if isinstance(v, np.ndarray) else float(v)
        params.update(self._extra_params())
        return {"method": self.method, "params": params}

    def _extra_params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> Calibrator:
        if data.get("method") != cls.method:
            raise ArtifactIntegrityError(
                f"calibrator params are for method {data.get('method')!r}, not {cls.method!r}"
            )
        params = dict(data.get("params", {}))
        obj = cls._from_extra_params(params)
        missing = [k for k in cls._param_names if k not in params]
        if missing:
            raise ArtifactIntegrityError(f"{cls.method} calibrator params lack {missing}")
        for k in cls._param_names:
            v = params[k]
            setattr(obj, k + "_", np.asarray(v, dtype=np.float64) if isinstance(v, list) else float(v))
        return obj

    @classmethod
    def _from_extra_params(cls, params: dict[str, Any]) -> Calibrator:
        return cls()

    def __repr__(self) -> str:
        fitted = {k: getattr(self, k + "_") for k in self._param_names if hasattr(self, k + "_")}
        shown = {k: (f"<{v.size} values>" if isinstance(v, np.ndarray) else round(v, 6)) for k, v in fitted.items()}
        return f"{type(self).__name__}({shown})"


class TemperatureScaling(Calibrator):
    """q = σ(z / T), T > 0 by NLL (Guo et al. 2017). Learned: `temperature_`."""

    method = "temperature"
    _param_names = ("temperature",)

    def fit(self, scores: Any, y: Any) -> TemperatureScaling:
        z = as_margin(scores)
        t = as_binary_labels(y, z.shape[0])
        (w,) = _fit_logistic(z[:, None], t, x0=np.array([1.0]), bounds=[(_MIN_INV_TEMPERATURE, None)])
        self.temperature_ = 1.0 / float(w)
        return self

    def predict_logit(self, scores: Any) -> np.ndarray:
        self._check_fitted()
        return as_margin(scores) / self.temperature_

    def predict_proba(self, scores: Any) -> np.ndarray:
        return expit(self.predict_logit(scores))


class ClasswiseTemperature(Calibrator):
    """q1 = σ(z1 / T1 - z0 / T0) on [N, 2] logits. Learned: `temperature_pos_`, `temperature_neg_`.

    Unlike the others this is not a function of the margin alone: it is
    non-decreasing in z1 and non-increasing in z0.
    """

    method = "classwise_temperature"
    _param_names = ("temperature_pos", "temperature_neg")

    def fit(self, scores: Any, y: Any) -> ClasswiseTemperature:
        s = as_two_class_logits(scores)
        t = as_binary_labels(y, s.shape[0])
        features = np.stack([s[:, 1], -s[:, 0]], axis=1)
        w = _fit_logistic(features, t, x0=np.ones(2), bounds=[(_MIN_INV_TEMPERATURE, None)] * 2)
        self.temperature_pos_ = 1.0 / float(w[0])
        self.temperature_neg_ = 1.0 / float(w[1])
        return self

    def predict_logit(self, scores: Any) -> np.ndarray:
        self._check_fitted()
        s = as_two_class_logits(scores)
        return s[:, 1] / self.temperature_pos_ - s[:, 0] / self.temperature_neg_

    def predict_proba(self, scores: Any) -> np.ndarray:
        return expit(self.predict_logit(scores))


class PlattScaling(Calibrator):
    """q = σ(a z + b) by NLL (Platt 1999). Learned: `a_`, `b_`.

    `platt_targets=True` replaces the 0/1 labels by Platt's smoothed targets
    (n₊+1)/(n₊+2) and 1/(n₋+2), as scikit-learn's method="sigmoid" does; the
    default fits the plain NLL so that TS ⊂ Platt ⊂ Beta hold on the same loss.
    """

    method = "platt"
    _param_names = ("a", "b")

    def __init__(self, platt_targets: bool = False) -> None:
        self.platt_targets = platt_targets

    def fit(self, scores: Any, y: Any) -> PlattScaling:
        z = as_margin(scores)
        t = as_binary_labels(y, z.shape[0])
        if self.platt_targets:
            n_pos = float(t.sum())
            n_neg = float(t.shape[0] - n_pos)
            t = np.where(t > 0, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
        # Warm start from temperature scaling (b = 0, a = 1/T): nested model.
        (w0,) = _fit_logistic(z[:, None], t, x0=np.array([1.0]), bounds=[(_MIN_INV_TEMPERATURE, None)])
        features = np.stack([z, np.ones_like(z)], axis=1)
        # a >= 0 keeps the map monotone non-decreasing (a score-inverting model would
        # move the threshold's operating point); TS's optimum is feasible, so nesting holds.
        a, b = _fit_logistic(features, t, x0=np.array([w0, 0.0]),
                             bounds=[(_MIN_INV_TEMPERATURE, None), (None, None)])
        self.a_, self.b_ = float(a), float(b)
        return self

    def _extra_params(self) -> dict[str, Any]:
        return {"platt_targets": bool(self.platt_targets)}

    @classmethod
    def _from_extra_params(cls, params: dict[str, Any]) -> PlattScaling:
        return cls(platt_targets=bool(params.get("platt_targets", False)))

    def predict_logit(self, scores: Any) -> np.ndarray:
        self._check_fitted()
        return self.a_ * as_margin(scores) + self.b_

    def predict_proba(self, scores: Any) -> np.ndarray:
        return expit(self.predict_logit(scores))


def _beta_features(z: np.ndarray) -> np.ndarray:
    # ln s and -ln(1 - s) for s = σ(z), without ever forming s (no log(0) at |z| > 37).
    return np.stack([log_expit(z), -log_expit(-z), np.ones_like(z)], axis=1)


class BetaCalibration(Calibrator):
    """logit q = c + a ln s - b ln(1 - s), s = σ(z), a, b >= 0 (Kull et al. 2017, "abm").

    Fitted as the box-constrained NLL optimum (L-BFGS-B, a, b >= 0), warm-started
    from Platt (a = b = a_platt, c = b_platt) so NLL_Beta <= NLL_Platt. betacal
    instead refits without the offending feature when an unconstrained
    coefficient is negative; both land on the same optimum in the usual cases.
    Learned: `a_`, `b_`, `c_`.
    """

    method = "beta"
    _param_names = ("a", "b", "c")

    def fit(self, scores: Any, y: Any) -> BetaCalibration:
        z = as_margin(scores)
        t = as_binary_labels(y, z.shape[0])
        platt = PlattScaling().fit(z, t)
        a0 = max(platt.a_, 0.0)
        x0 = np.array([a0, a0, platt.b_ if platt.a_ >= 0 else 0.0])
        a, b, c = _fit_logistic(_beta_features(z), t, x0=x0, bounds=[(0.0, None), (0.0, None), (None, None)])
        self.a_, self.b_, self.c_ = float(a), float(b), float(c)
        return self

    def predict_logit(self, scores: Any) -> np.ndarray:
        self._check_fitted()
        return _beta_features(as_margin(scores)) @ np.array([self.a_, self.b_, self.c_])

    def predict_proba(self, scores: Any) -> np.ndarray:
        return expit(self.predict_logit(scores))


class IsotonicCalibration(Calibrator):
    """Isotonic regression of y on the margin z (sklearn), clipped to [eps, 1 - eps].

    The fitted step function is saved as its breakpoints (`x_thresholds_`,
    `y_thresholds_`) and evaluated with np.interp, which is what sklearn's
    `predict` computes (linear between breakpoints, constant outside). The clip
    keeps NLL finite; it preserves monotonicity.
    """

    method = "isotonic"
    _param_names = ("x_thresholds", "y_thresholds")

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def fit(self, scores: Any, y: Any) -> IsotonicCalibration:
        z = as_margin(scores)
        t = as_binary_labels(y, z.shape[0])
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(z, t)
        self.x_thresholds_ = np.asarray(iso.X_thresholds_, dtype=np.float64)
        self.y_thresholds_ = np.asarray(iso.y_thresholds_, dtype=np.float64)
        return self

    def _extra_params(self) -> dict[str, Any]:
        return {"eps": float(self.eps)}

    @classmethod
    def _from_extra_params(cls, params: dict[str, Any]) -> IsotonicCalibration:
        return cls(eps=float(params.get("eps", 1e-6)))

    def predict_proba(self, scores: Any) -> np.ndarray:
        self._check_fitted()
        p = np.interp(as_margin(scores), self.x_thresholds_, self.y_thresholds_)
        return np.clip(p, self.eps, 1.0 - self.eps)


CALIBRATORS: dict[str, type[Calibrator]] = {
    "temperature": TemperatureScaling,
    "classwise_temperature": ClasswiseTemperature,
    "platt": PlattScaling,
    "beta": BetaCalibration,
    "isotonic": IsotonicCalibration,
}


def calibrator_from_params(data: dict[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from `Calibrator.to_params()` output."""
    method = data.get("method") if isinstance(data, dict) else None
    if method not in CALIBRATORS:
        raise ArtifactIntegrityError(
            f"unknown calibrator method {method!r}; known: {sorted(CALIBRATORS)}"
        )
    return CALIBRATORS[method].from_params(data)
