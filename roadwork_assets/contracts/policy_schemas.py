"""Schemas of the exit-policy artifacts: policies/{softmax,gate,scrc}.json under the
artifact root (`ArtifactRegistry.policy`), and the one policy a bundle ships, policy.json.

Three kinds share one decision rule on the calibrated main-view probability p:
negative iff p <= t_lo, positive iff p > t_hi, defer otherwise; the gate kind
adds "defer if the gate says the stage-1 decision is likely wrong", the scrc
kind adds "defer unless the conformal set is a singleton". `parse_policy` is the
only way an artifact dict becomes an applicable policy: unknown versions or kinds
are refused with an ArtifactIntegrityError that says what to do.

A policy that could not be fitted for a data reason (too few scenes with roadwork,
say) is still written, as an `UnfittedPolicy` record (`fitted: false` plus the
reason), so one unfittable policy never blocks the others; `parse_policy_artifact`
reads either, and only the bundle that is configured to ship it refuses it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import Provenance, ScoreReference

SCHEMA_VERSION = 2  # 2: calibration_unit, n_calibration_units; unfitted records
# policy kind -> the asset that fits it: the one place this mapping is written
POLICY_ASSET_NAMES: dict[str, str] = {"softmax": "thresholds", "gate": "gate_params",
                                      "scrc": "conformal_sets", "cascade": "cascade_policy"}
POLICY_KINDS = tuple(POLICY_ASSET_NAMES)
# kinds fitted on stage-1 logits alone (`core.calibration.policies.fit_policy`); the
# cascade also needs stage 2 (`core.calibration.cascade.fit_cascade_policy`)
STAGE1_POLICY_KINDS = ("softmax", "gate", "scrc")
CalibratorMethod = Literal["temperature", "classwise_temperature", "platt", "beta", "isotonic"]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Level = Annotated[float, Field(gt=0.0, lt=1.0)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CalibratorSpec(_Frozen):
    """A fitted calibrator as `Calibrator.to_params()` writes it."""

    method: CalibratorMethod
    params: dict[str, Any]


class CalibratorCandidate(_Frozen):
    """Held-out scores of one calibrator tried during selection (lower is better)."""

    method: CalibratorMethod
    nll: float
    ece: float
    brier: float


class ThresholdPartStats(_Frozen):
    """What the fitted policy did on the threshold part of val_calib (in-sample estimates)."""

    fnr: Probability  # positives decided negative / all positives (deferrals are not misses)
    n_misses: int = Field(ge=0)
    defer_rate: Probability
    coverage: Probability  # 1 - defer_rate
    fpr: Probability  # negatives decided positive / all negatives
    positive_exit_fdr: Probability | None = None  # negatives among positive exits
    selective_risk: Probability | None = None  # errors among accepted


class _PolicyBase(_Frozen):
    schema_version: Literal[2] = 2
    fitted: Literal[True] = True
    provenance: Provenance | None = None  # data (logits[val_calib]) and code version
    main_view: int = Field(default=0, ge=0)
    calibrator: CalibratorSpec
    calibrator_candidates: list[CalibratorCandidate] = Field(default_factory=list)
    t_lo: float  # negative iff p <= t_lo (may be below 0: nothing is ever negative)
    t_hi: float  # positive iff p > t_hi (1.0: no positive exits)
    alpha: Level
    delta: Level | None = None
    guarantee: Literal["crc_expectation", "ltt_high_probability"]
    guarantee_statement: str = Field(min_length=1)
    n_calib_fit: int = Field(ge=1)
    n_calib_threshold: int = Field(ge=1)
    n_pos_threshold: int = Field(ge=1)
    n_neg_threshold: int = Field(ge=0)
    # the exchangeable unit of the FNR guarantee: "group" = one per scene/group with
    # roadwork (the guarantee is for a new scene), "image" = one per positive image
    calibration_unit: Literal["image", "group"]
    n_calibration_units: int = Field(ge=1)  # units with roadwork in the threshold part
    fit_fraction: Level = 0.5
    split_rule: str = "sha256(salt:image_id) order within each label; fit part first"
    threshold_part: ThresholdPartStats
    score_reference: ScoreReference | None = None  # threshold-part scores, for the shift test

    @model_validator(mode="after")
    def _check_thresholds(self):
        if self.t_hi < self.t_lo:
            raise ValueError(f"t_hi={self.t_hi} must be >= t_lo={self.t_lo}")
        if self.guarantee == "ltt_high_probability" and self.delta is None:
            raise ValueError("an LTT guarantee needs delta")
        return self


class SoftmaxPolicyParams(_PolicyBase):
    """Calibrated-softmax exit: thresholds only. two_way has t_hi == t_lo (no deferral)."""

    kind: Literal["softmax"] = "softmax"
    mode: Literal["two_way", "three_way"] = "two_way"
    positive_fdr_target: Level | None = None
    positive_exit_certified: bool | None = None


class GateSpec(_Frozen):
    """A fitted failure gate (standardised logistic regression) and its accept rule."""

    feature_names: list[str]
    C: float = Field(gt=0.0)
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    tau: float  # accept iff P(wrong) <= tau; -1: defer everything
    gate_risk: Level
    risk_met: bool
    accept_rate: Probability
    selective_risk: Probability | None = None
    selective_risk_upper: Probability | None = None
    aurc_gate: float
    aurc_baseline: float
    beats_baseline: bool
    # no stage-1 decision of the fit part was wrong: a constant gate with tau = 1 that
    # accepts every image (a near-perfect stage 1 needs no gate)
    accepts_all: bool = False

    @model_validator(mode="after")
    def _check_lengths(self):
        n = len(self.feature_names)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ValueError("gate mean/scale/coef must have one entry per feature name")
        return self


class GatePolicyParams(_PolicyBase):
    kind: Literal["gate"] = "gate"
    gate: GateSpec


class ScrcPolicyParams(_PolicyBase):
    """Set-valued exit: conformal sets (class c in the set iff 1 - p_c <= q_c);
    singleton {1} exits positive, singleton {0} exits negative only if p <= t_lo
    (the FNR-controlled threshold), anything else defers."""

    kind: Literal["scrc"] = "scrc"
    conformal_method: Literal["lac", "mondrian"]
    conformal_alpha: Level
    q0: float
    q1: float
    coverage: dict[str, float | None] = Field(default_factory=dict)


class UnfittedPolicy(_Frozen):
    """The artifact of a policy that could not be fitted for a data reason.

    Written in place of the policy so that its asset still materializes; applying or
    bundling it is refused with `reason`.
    """

    schema_version: Literal[2] = 2
    fitted: Literal[False] = False
    kind: Literal["softmax", "gate", "scrc", "cascade"]
    reason: str = Field(min_length=1)  # the InsufficientDataError message, verbatim
    error: str = "InsufficientDataError"  # the exception class that stopped the fit
    provenance: Provenance | None = None


class CascadeFrontierPoint(_Frozen):
    """One λ of the cascade's nested family, scored on the threshold part (for plotting)."""

    lam: Probability  # λ = 1 - t2, clipped to [0, 1]
    t2: float  # stage-2 threshold; stage 1 exits negative iff p1 <= rho * t2
    crc_bound: Probability  # (Σ_g L_g + 1)/(n_g + 1): the smallest α certifying this λ
    certified: bool  # crc_bound <= alpha (λ >= the certified λ̂)
    fnr: Probability  # served image-level FNR on the threshold part (in-sample)
    reward: Probability  # estimated validator reward (0.5·MCC + 0.5·accuracy)^3
    routing_rate: Probability
    latency_s: float = Field(ge=0.0)


class CascadeAlphaPoint(_Frozen):
    """What one α costs: the cascade refitted at that α (shape, λ, reward, latency)."""

    alpha: Level
    feasible: bool
    reason: str | None = None  # why not, when infeasible (too few scenes with roadwork)
    lam: Probability | None = None
    rho: float | None = None
    exit_pos_floor: float | None = None
    crc_bound: Probability | None = None
    reward: Probability | None = None
    routing_rate: Probability | None = None
    latency_s: float | None = None
    latency_budget_met: bool | None = None


class CascadeShapeCandidate(_Frozen):
    """A shape (rho, exit_pos_floor) tried on the fit part, at its CRC-like λ there."""

    rho: float = Field(gt=0.0, le=1.0)
    exit_pos_floor: float
    lam: Probability
    reward: Probability
    routing_rate: Probability
    latency_s: float = Field(ge=0.0)
    within_budget: bool


class CascadePolicyParams(_Frozen):
    """Two-stage cascade with one FNR guarantee over the composed decision
    (`core.calibration.cascade`): with p1 the calibrated stage-1 probability and p2 stage 2's,

        negative at stage 1  iff p1 <= t_exit_neg  (= rho * t2)
        positive at stage 1  iff p1 >  t_exit_pos  (= max(t_exit_neg, exit_pos_floor))
        else routed: stage 2 says positive iff p2 > t2.

    p1 is stage 1's main view through `calibrator_stage1`, p2 stage 2's pooled logits
    (`contracts.multiview_schemas.MultiviewCheckpoint`, sha256 `stage2_sha256`) through
    `calibrator_stage2`; both calibrators were fitted on the val_calib fit part only.
    """

    schema_version: Literal[2] = 2
    fitted: Literal[True] = True
    kind: Literal["cascade"] = "cascade"
    provenance: Provenance | None = None
    composition: Literal["crc_one_lambda"] = "crc_one_lambda"
    main_view: int = Field(0, ge=0)
    calibrator_stage1: CalibratorSpec | None = None  # None: p1 / p2 given as probabilities
    calibrator_stage2: CalibratorSpec | None = None
    stage2_sha256: str | None = None  # the multiview_checkpoint file stage 2 was fitted as
    latency_source: Literal["measured", "configured"] = "configured"
    # stage 1's calibrated p1 on the threshold part, per class: test_report's KS check that
    # val_test's scores are exchangeable with the ones the guarantee was certified on
    score_reference: ScoreReference | None = None
    guarantee: Literal["crc_expectation"] = "crc_expectation"
    guarantee_statement: str = Field(min_length=1)
    alpha: Level
    lam: Probability  # the λ served (>= lambda_certified)
    lambda_certified: Probability  # λ̂: the smallest λ CRC certifies at alpha
    rho: float = Field(gt=0.0, le=1.0)
    exit_pos_floor: float
    t_exit_neg: float
    t_exit_pos: float
    t2: float
    crc_bound: Probability  # (Σ_g L_g(λ) + 1)/(n_g + 1) at the served λ, <= alpha
    latency_stage1_s: float = Field(ge=0.0)
    latency_stage2_s: float = Field(ge=0.0)
    latency_budget_s: float = Field(gt=0.0)
    routing_rate: Probability  # threshold part
    expected_latency_s: float = Field(ge=0.0)  # latency_stage1_s + routing_rate * latency_stage2_s
    latency_budget_met: bool
    positive_prior: Probability | None = 0.5  # the validator's label mix; None: the data's
    estimated_reward: Probability
    estimated_mcc: Probability  # clamped at 0, as the validator does
    estimated_accuracy: Probability
    threshold_fnr: Probability  # served image-level FNR on the threshold part (in-sample)
    n_calib_fit: int = Field(ge=0)
    n_calib_threshold: int = Field(ge=1)
    n_pos_threshold: int = Field(ge=1)
    n_neg_threshold: int = Field(ge=1)
    calibration_unit: Literal["image", "group"]
    n_calibration_units: int = Field(ge=1)
    fit_fraction: Level = 0.5
    split_rule: str
    shape_candidates: list[CascadeShapeCandidate] = Field(default_factory=list)
    frontier: list[CascadeFrontierPoint] = Field(default_factory=list)
    alpha_frontier: list[CascadeAlphaPoint] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_cascade(self):
        if self.t_exit_pos < self.t_exit_neg:
            raise ValueError(f"t_exit_pos={self.t_exit_pos} must be >= t_exit_neg={self.t_exit_neg}")
        if self.lam < self.lambda_certified:
            raise ValueError(f"lam={self.lam} is below the certified lambda {self.lambda_certified}")
        return self


PolicyParams = Annotated[
    SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams | CascadePolicyParams,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(PolicyParams)


def parse_policy_artifact(
    data: Any,
) -> SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams | CascadePolicyParams | UnfittedPolicy:
    """Validate a policy artifact dict, fitted (`parse_policy`) or an `UnfittedPolicy`."""
    if isinstance(data, dict) and data.get("fitted") is False and data.get("schema_version") == SCHEMA_VERSION:
        try:
            return UnfittedPolicy.model_validate(data)
        except ValidationError as err:
            raise ArtifactIntegrityError(f"unfitted-policy record is invalid: {err}") from err
    return parse_policy(data)


def parse_policy(data: Any) -> SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams | CascadePolicyParams:
    """Validate a fitted policy artifact dict; refuse unknown schema versions and kinds,
    and unfitted records (they cannot be applied)."""
    if not isinstance(data, dict):
        raise ArtifactIntegrityError(f"a policy artifact must be a JSON object; got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactIntegrityError(
            f"policy artifact has schema_version={version!r}; this code reads schema_version "
            f"{SCHEMA_VERSION} only. Re-fit the policy with this version of roadwork_assets."
        )
    kind = data.get("kind")
    if data.get("fitted") is False:
        reason = " ".join(str(data.get("reason", "no reason recorded")).split())
        raise ArtifactIntegrityError(
            f"policy artifact of kind {kind!r} records fitted: false ({reason}); it cannot be "
            "applied. Add calibration data and re-fit it, or use another policy kind."
        )
    if kind not in POLICY_KINDS:
        raise ArtifactIntegrityError(
            f"policy artifact has kind={kind!r}; known kinds are {list(POLICY_KINDS)}."
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ArtifactIntegrityError(f"policy artifact of kind {kind!r} is invalid: {err}") from err


def policy_to_json(params: SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams) -> str:
    return params.model_dump_json(indent=2)


def policy_from_json(text: str) -> SoftmaxPolicyParams | GatePolicyParams | ScrcPolicyParams:
    import json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactIntegrityError(f"policy artifact is not valid JSON: {err}") from err
    return parse_policy(data)
