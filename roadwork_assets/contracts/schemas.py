"""Pydantic schemas for the JSON artifacts and the checkpoint's metadata.

Every JSON artifact carries ``schema_version``; a version this code does not know is
refused with a message that says which version was found and which are supported,
instead of being half-understood.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.validator_schemas import ValidatorSimulation

LABEL_NAMES: dict[int, str] = {0: "none", 1: "roadwork"}

CHECKPOINT_SCHEMA_VERSION = 1


class CheckpointMeta(BaseModel):
    """Everything in a checkpoint file but its tensors. The file (``model.pt``, read with
    ``torch.load(weights_only=True)``) is this model's fields plus ``model_state_dict``;
    ``core.training.checkpoint`` validates it on save and on load."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = 1
    epoch: int = Field(ge=0, description="the epoch selected on val_select")
    best_metric: float
    best_metric_name: str
    config: dict[str, Any] = Field(description="TrainerConfig.model_dump() it was trained "
                                   "with; rebuilds the architecture")
    backbone_name: str
    mode: Literal["end_to_end", "frozen", "lora", "dora", "explora"]
    adapter: dict[str, Any] | None = Field(
        None, description="lora/dora/explora: the adapter settings (kind, rank, alpha, "
        "dropout, targets), merged=True, and what training measured; None otherwise")
    data_version: str = Field(description="combined data_version of train and val_select")
    code_version: str
    assignment_version: str = Field(
        description="the split assignment train and val_select came from; logits refuse "
        "embeddings of any other assignment (they may hold training images)")
    weights_sha256: str = Field(
        description="sha256 of the frozen backbone's weights file ('' when trained from "
        "scratch); logits refuse embeddings made with other weights")
    img_size: int = Field(description="input size; when not given, config['img_size']")
    select_metrics: dict[str, float] = Field(
        default_factory=dict, description="val_select metrics at the selected epoch")
    training_recipe: dict[str, Any] = Field(
        default_factory=dict, description="what the training recipe resolved to at run "
        "time: AMP dtype and the measurement behind it, EMA weights selected, augmentation "
        "and selection views (empty for checkpoints written before it existed)")

    @model_validator(mode="before")
    @classmethod
    def _img_size_from_config(cls, data: Any) -> Any:
        config = data.get("config") if isinstance(data, dict) else None
        if isinstance(config, dict) and "img_size" in config:
            if data.get("img_size") is None:
                return {**data, "img_size": config["img_size"]}
            if data["img_size"] != config["img_size"]:
                raise ValueError(f"img_size {data['img_size']!r} differs from config "
                                 f"img_size {config['img_size']!r}")
        return data


class Provenance(BaseModel):
    """Which data and code produced an artifact."""

    model_config = ConfigDict(extra="forbid")
    data_version: str = Field(description="sha256 of the split manifest(s) read")
    code_version: str = Field(description="hash of the roadwork_assets sources")
    created_at: str
    checkpoint_sha256: str | None = Field(
        None, description="the checkpoint whose outputs this artifact was fitted/scored on")
    settings: dict[str, dict[str, Any]] | None = Field(
        None, description="settings groups that made it: {group: {sha256, values}} "
        "(core.artifacts.settings_record); absent in artifacts that predate it")


# The bundle layout is flat and fixed: role -> the one file name that role may have.
BUNDLE_LAYOUT: dict[str, str] = {
    "checkpoint": "model.pt",
    "policy": "policy.json",
    "onnx": "model.onnx",
    "probe": "probe.npz",
    "stage2": "stage2.json",  # cascade bundles only: the MultiviewCheckpoint (stage 2)
    "stage2_onnx": "stage2.onnx",  # cascade bundles only, with ONNX export: stage 2's network
}
BUNDLE_REQUIRED_ROLES = ("checkpoint", "policy", "probe")
STAGE2_ROLES = ("stage2", "stage2_onnx")
BUNDLE_IMG_SIZE = (16, 1024)  # what TrainerConfig accepts
BUNDLE_N_VIEWS = (1, 4)  # make_views: identity, h-flip, zoom, zoomed h-flip


def plain_file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name inside one directory (None if it is).

    A bundle is closed: an entry that is absolute, climbs with ``..`` or names a
    subfolder could make ``verify`` hash, and ``predict`` load, a file outside it."""
    if not name or name in {".", ".."}:
        return "is empty or a directory reference"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "climbs out of the bundle folder with '..'"
    if "/" in name or "\\" in name:
        return "holds a path separator; bundle files live directly in the bundle folder"
    if "\x00" in name or name.startswith("."):
        return "is a hidden or malformed name"
    return None


class BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a plain file name inside the bundle directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        problem = plain_file_name_problem(value)
        if problem:
            raise ValueError(f"{value!r} {problem}")
        return value


class BundleStage2(BaseModel):
    """What a cascade bundle's stage 2 is (a summary of its ``stage2.json``)."""

    model_config = ConfigDict(extra="forbid")
    aggregator: Literal["mean", "max", "attention"]
    view_source: Literal["ten_crop", "cached_views"]
    views: list[str] = Field(min_length=1)
    crop_scale: float | None = None
    input_size: int


class BundleManifest(BaseModel):
    """schema_version 2 (closed bundles): fixed flat layout, a stored probe batch, the
    checkpoint's sha256 in the provenance, bounded img_size / n_views. Version-1
    manifests are refused with a message to rebuild (see core.export.bundle)."""

    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[2] = 2
    bundle_id: str
    policy_kind: Literal["softmax", "gate", "scrc", "cascade"]
    files: dict[str, BundleFile] = Field(
        description="role -> file; roles: checkpoint, policy, probe, onnx (optional); "
        "cascade bundles also stage2 and stage2_onnx (with onnx)"
    )
    stages: Literal[1, 2] = Field(
        1, description="2 for a cascade (stage 1 exits, stage 2 decides the routed images)")
    stage2: BundleStage2 | None = Field(None, description="the cascade's stage 2; None "
                                        "for a one-stage bundle")
    backbone_name: str
    mode: Literal["end_to_end", "frozen", "lora", "dora", "explora"]
    adapter: dict[str, Any] | None = Field(
        None, description="the checkpoint's adapter record (lora/dora/explora; merged into "
        "the weights, so serving needs no peft)")
    img_size: int
    n_views: int
    label_names: dict[int, str] = Field(default_factory=lambda: dict(LABEL_NAMES))
    decision_threshold: float = Field(
        0.5, description="the emitted probability is remapped so the policy decides at 0.5"
    )
    provenance: Provenance
    precision: Literal["fp32", "int8-dynamic"] = Field(
        "fp32", description="the served ONNX networks' precision; int8-dynamic: ONNX Runtime "
        "dynamic quantization (core.export.quantize), served by ONNX Runtime only, with a "
        "policy re-certified on the quantized model's own val_calib scores")
    source_bundle_id: str | None = Field(
        None, description="int8-dynamic only: the fp32 bundle that was quantized (lineage)")
    quantization: dict[str, Any] | None = Field(
        None, description="int8-dynamic only: the quantization settings and which ops it "
        "turned into integer ops")

    @field_validator("img_size")
    @classmethod
    def _img_size_bounds(cls, value: int) -> int:
        lo, hi = BUNDLE_IMG_SIZE
        if not lo <= value <= hi:
            raise ValueError(f"img_size {value} is outside {lo}..{hi}")
        return value

    @field_validator("n_views")
    @classmethod
    def _n_views_bounds(cls, value: int) -> int:
        lo, hi = BUNDLE_N_VIEWS
        if not lo <= value <= hi:
            raise ValueError(f"n_views {value} is outside {lo}..{hi}")
        return value

    @model_validator(mode="after")
    def _closed_layout(self) -> BundleManifest:
        for role, entry in self.files.items():
            expected = BUNDLE_LAYOUT.get(role)
            if expected is None:
                raise ValueError(f"files.{role}: unknown role (a bundle holds "
                                 f"{sorted(BUNDLE_LAYOUT)})")
            if entry.path != expected:
                raise ValueError(f"files.{role}.path is {entry.path!r}; the bundle layout "
                                 f"names it {expected!r}")
        missing = [r for r in BUNDLE_REQUIRED_ROLES if r not in self.files]
        if missing:
            extra = " (a bundle holds exactly one exit policy)" if "policy" in missing else ""
            raise ValueError(f"files names no {', '.join(missing)} file{extra}")
        if self.provenance.checkpoint_sha256 is None:
            raise ValueError("provenance.checkpoint_sha256 is missing")
        if self.precision != "fp32" and ("onnx" not in self.files or not self.source_bundle_id):
            raise ValueError(f"a {self.precision} bundle serves its ONNX files only and names "
                             "the fp32 bundle it quantized (files.onnx, source_bundle_id)")
        return self._stages_agree()

    def _stages_agree(self) -> BundleManifest:
        cascade = self.policy_kind == "cascade"
        carried = [r for r in STAGE2_ROLES if r in self.files]
        if not cascade and (carried or self.stages != 1 or self.stage2 is not None):
            raise ValueError(f"a {self.policy_kind!r} bundle has one stage and carries no "
                             f"stage-2 files (it names {carried}, stages {self.stages})")
        if cascade and ("stage2" not in self.files or self.stages != 2 or self.stage2 is None):
            raise ValueError("a cascade bundle has stages 2, a stage2 summary and a "
                             "stage2 file (stage2.json)")
        if ("onnx" in self.files) != ("stage2_onnx" in self.files) and cascade:
            raise ValueError("a cascade bundle exports both stages to ONNX or neither "
                             "(onnx and stage2_onnx)")
        return self


class RateWithInterval(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float | None
    errors: int
    n: int
    ci_low: float | None
    ci_high: float | None
    confidence: float = 0.95
    method: str = "clopper-pearson (exact binomial)"


class ScoreReference(BaseModel):
    """The policy's own score distribution, kept so the test report can look for shift
    without reading val_calib: calibrated main-view P(roadwork) on the threshold part of
    val_calib, sorted, per class. Every score when there are at most ``max_points``; else
    every ``stride``-th order statistic of each class (same stride, so the classes keep
    their proportions in ``all``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    source: str = "val_calib threshold part"
    score: str = "calibrated P(roadwork), main view"
    n_positive: int = Field(ge=0, description="scores the sketch stands for")
    n_negative: int = Field(ge=0)
    stride: int = Field(1, ge=1, description="1: every score is stored (exact)")
    positives: list[float]
    negatives: list[float]


class KsTest(BaseModel):
    """Two-sample Kolmogorov-Smirnov test of val_test scores against the reference."""

    model_config = ConfigDict(extra="forbid")
    group: Literal["positives", "negatives", "all"]
    n_reference: int
    n_test: int
    statistic: float | None = Field(None, description="sup |F_ref - F_test|; None if a side is empty")
    p_value: float | None = None
    reference_median: float | None = None
    test_median: float | None = None
    shifted: bool = Field(False, description="p_value < level")


class ScoreShift(BaseModel):
    """Does val_test look exchangeable with val_calib, as the FNR guarantee assumes?"""

    model_config = ConfigDict(extra="forbid")
    method: str = "two-sample Kolmogorov-Smirnov, two-sided (scipy.stats.ks_2samp)"
    score: str = "calibrated P(roadwork), main view"
    reference: str = "val_calib threshold part, stored in the policy (score_reference)"
    level: float
    reference_stride: int = 1
    tests: list[KsTest]
    warning: str | None = None
    note: str | None = None


class ServedRowMetrics(BaseModel):
    """One way of serving, scored from the val_test logits (clean images, no augmentation):
    its decisions as the validator binarises them (np.round at 0.5), every image answered."""

    model_config = ConfigDict(extra="forbid")
    name: str  # cascade_served, stage1_served, single_view_0.5, stage2_0.5
    description: str
    n: int
    accuracy: float
    balanced_accuracy: float
    mcc: float = Field(description="sklearn MCC, not clamped")
    fnr: RateWithInterval
    fpr: RateWithInterval
    reward: float | None = Field(
        description="closed-form StreetVision reward at this row's TPR/TNR (labels 50/50, "
        "(0.5 max(0, MCC@100) + 0.5 acc@10)^3), clean images; None: one class only")
    routing_rate: float | None = Field(None, description="cascade only: share of images "
                                       "decided by stage 2")


class CascadeServing(BaseModel):
    """How the cascade bundle served val_test: routing and latency per image."""

    model_config = ConfigDict(extra="forbid")
    n_routed: int
    routing_rate: float = Field(description="share of val_test images decided by stage 2")
    expected_latency_s: float = Field(
        description="latency_stage1_s + routing_rate * latency_stage2_s (val_test routing)")
    latency_stage1_s: float
    latency_stage2_s: float
    latency_budget_s: float
    latency_budget_met: bool = Field(description="expected_latency_s <= latency_budget_s")
    latency_source: str = Field(description="the policy's: measured or configured")
    policy_routing_rate: float = Field(description="the policy's routing rate on val_calib")
    alpha: float
    lam: float
    crc_bound: float = Field(description="the policy's CRC bound on val_calib at the served λ")
    stage2_sha256: str | None


class PriceOfGuarantee(BaseModel):
    """What the FNR guarantee costs: the reference miner (the calibrated single-view model
    at 0.5) minus the bundle as served. Positive = the guarantee costs that much."""

    model_config = ConfigDict(extra="forbid")
    reference: str = "single_view_0.5"
    served: str  # cascade_served (or stage1_served for a stage-1 bundle)
    mcc_gap: float = Field(description="val_test MCC of reference minus served (logits)")
    reward_gap: float | None = Field(
        description="closed-form reward of reference minus served (logits)")
    validator_reward_gap: float | None = Field(
        None, description="simulated validator reward of reference minus served; None when "
        "the simulator is off or lacks a row")
    fnr_reference: float | None
    fnr_served: float | None


class SourceMetrics(BaseModel):
    """One source's share of val_test (several sources in ROADWORK_DATA): the served
    decision (emitted probability > 0.5, as the overall numbers) and the exit policy's
    (a deferred positive is not a miss). Counts over the sources sum to the report's."""

    model_config = ConfigDict(extra="forbid")
    source: str
    n_images: int
    n_positive: int
    accuracy: float
    mcc: float
    fnr: RateWithInterval
    fpr: RateWithInterval
    confusion_matrix: list[list[int]] = Field(description="rows: true 0/1, cols: pred 0/1")
    policy_fnr: RateWithInterval
    policy_defer_rate: float


class TestReport(BaseModel):
    """Final evaluation on val_test only.

    ``served``: what StreetVision scores — the bundle's emitted probability binarised at
    0.5, every image answered (a deferred image is emitted as roadwork). ``policy``: the
    three-way exit (positive / negative / defer); its FNR counts a positive as missed
    only when the policy says negative. ``model``: the calibrated probability at 0.5,
    without the policy — the classifier's own quality. ``validator``: the same ways of
    serving, scored by a simulated StreetVision validator (augmented images, its reward).
    """

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="forbid")
    # 2: the validator simulation; 3: the four-row comparison, cascade serving, the price
    # of the guarantee; 4: per_source (an older report is refused with 're-materialize
    # test_report')
    schema_version: Literal[4] = 4
    split: Literal["val_test"] = "val_test"
    n_images: int
    n_positive: int
    policy_kind: str
    bundle_id: str
    accuracy: float
    balanced_accuracy: float
    mcc: float
    auroc: float | None
    ece: float | None
    ece_bins: int
    fnr: RateWithInterval
    fpr: RateWithInterval
    confusion_matrix: list[list[int]] = Field(description="rows: true 0/1, cols: pred 0/1")
    policy_fnr: RateWithInterval
    policy_defer_rate: float
    model_balanced_accuracy: float = Field(
        description="the calibrated model alone, thresholded at 0.5 (no exit policy)")
    served: dict[str, Any]
    policy: dict[str, Any]
    model: dict[str, Any]
    score_shift: ScoreShift | None = Field(
        None, description="KS tests of val_test vs val_calib scores; None: the policy has "
        "no score_reference")
    shift_warning: str | None = Field(
        None, description="set when val_test looks not exchangeable with val_calib")
    validator: ValidatorSimulation | None = Field(
        None, description="the StreetVision validator simulator on val_test, one row per "
        "way of serving (stage1_served, single_view_0.5, ...); None: switched off "
        "(exit_policy.validator_images = 0)")
    comparison: list[ServedRowMetrics] = Field(
        default_factory=list, description="the ways of serving side by side on the val_test "
        "logits: cascade_served, stage1_served, single_view_0.5, stage2_0.5 (those that apply)")
    skipped_rows: dict[str, str] = Field(
        default_factory=dict, description="comparison rows left out, and why")
    cascade: CascadeServing | None = Field(None, description="cascade bundles only")
    price_of_guarantee: PriceOfGuarantee | None = None
    per_source: list[SourceMetrics] = Field(
        default_factory=list, description="every served metric per source of val_test "
        "(split_manifest's source column), one row per source, sorted by name")
    provenance: Provenance

    def row(self, name: str) -> ServedRowMetrics:
        for r in self.comparison:
            if r.name == name:
                return r
        raise KeyError(f"no comparison row {name!r}; rows: {[r.name for r in self.comparison]}")


M = TypeVar("M", bound=BaseModel)


def load_json_artifact(path: Path, model: type[M], what: str | None = None) -> M:
    """Read and validate a versioned JSON artifact; refuse unknown versions clearly."""
    path = Path(path)
    what = what or model.__name__
    if not path.exists():
        raise ArtifactIntegrityError(f"{what} missing at {path}: materialize it first")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactIntegrityError(f"{what} at {path} is not valid JSON: {exc}") from exc
    return validate_artifact(raw, model, f"{what} at {path}")


def validate_artifact(raw: Any, model: type[M], where: str) -> M:
    if not isinstance(raw, dict):
        raise ArtifactIntegrityError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    supported = model.model_fields["schema_version"].annotation
    allowed = getattr(supported, "__args__", ())
    found = raw.get("schema_version")
    if found not in allowed:
        raise ArtifactIntegrityError(
            f"{where}: schema_version {found!r} is not supported (this code reads "
            f"{list(allowed)}); re-materialize the artifact with this version of "
            "roadwork_assets or upgrade the code"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactIntegrityError(f"{where} does not match its schema:\n{exc}") from exc
