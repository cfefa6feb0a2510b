"""Resources: where artifacts live, where data comes from, how to train, which policy.

All pydantic-typed (Dagster ConfigurableResource); every field can be overridden per
run in the launchpad or with ``--config-json``. Environment variables give the defaults:
ROADWORK_HOME (artifact root), ROADWORK_DATA (dataset), ROADWORK_WEIGHTS (frozen
backbone weights file), ROADWORK_MLFLOW_URI (tracking server).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.calibration.cascade import CascadeConfig
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.core.data.multi_source import SourceSpec, parse_source_specs
from roadwork_assets.core.data.similarity import NearDuplicateRule
from roadwork_assets.core.data.splits import DEFAULT_FRACTIONS
from roadwork_assets.core.training.config import DEFAULT_FROZEN_BACKBONE, TrainerConfig


def default_home() -> str:
    return str(Path(os.environ.get("ROADWORK_HOME", Path.home() / ".roadwork")).expanduser())


class ArtifactRegistryResource(dg.ConfigurableResource):
    root: str = Field(description="artifact root; every artifact path is under it")

    @property
    def registry(self) -> ArtifactRegistry:
        return ArtifactRegistry(Path(self.root))


class DatasetSource(dg.ConfigurableResource):
    """Where images come from and how they are split."""

    spec: str | None = Field(
        None,
        description="a class-folder tree (roadwork/, none/), a CSV/parquet manifest, or "
        "NATIX parquet file/dir; several separated by os.pathsep (':' on Linux), each "
        "optionally name=path (core.data.sources.parse_source_specs); None = the generated "
        "default dataset",
    )
    holdout_source: str | None = Field(
        None, description="cross-source evaluation: every image of this source (and its "
        "copies elsewhere) goes to val_test, the other sources fill train / val_select / "
        "val_calib (core.data.splits.split_images)")
    source_balance: Literal["none", "equal", "weights"] = Field(
        "none", description="training draw weights per source: none (as many draws as "
        "images), equal (each source the same share of train draws), weights "
        "(source_weights); train only, never calibration or test rows "
        "(core.data.balance)")
    source_weights: dict[str, float] = Field(
        default_factory=dict, description="source_balance=weights: {source name: relative "
        "share of train draws}; every train source must be named")
    default_n_images: int = Field(6000, ge=8)
    default_image_size: int = Field(128, ge=32)
    default_seed: int = 0
    split_fractions: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    split_seed: int = 0
    near_duplicate_distance: int = Field(
        6, ge=0, le=20, description="max pHash Hamming distance of a near-duplicate candidate"
    )
    near_duplicate_max_residual: float = Field(
        0.8, gt=0, description="max aligned-thumbnail residual (95th percentile) that makes a "
        "pHash candidate a likely copy of the same photo (core.data.similarity)")
    near_duplicate_certain_residual: float = Field(
        0.5, gt=0, description="max residual (98th percentile) of a certain copy; only certain "
        "copies chain past near_duplicate_max_loose_group units")
    near_duplicate_max_loose_group: int = Field(
        8, ge=2, description="most units (scenes or distinct photos) likely-copy links may join")
    max_group_share: float = Field(
        0.01, gt=0, le=1, description="blocking check split_shape: no group (scene, or copies "
        "of one photo) may hold more than this share of the images")

    def near_duplicate_rule(self) -> NearDuplicateRule:
        return NearDuplicateRule(max_distance=self.near_duplicate_distance,
                                 max_residual=self.near_duplicate_max_residual,
                                 certain_residual=self.near_duplicate_certain_residual,
                                 max_loose_group=self.near_duplicate_max_loose_group)

    def sources(self) -> list[SourceSpec]:
        """The named sources ``spec`` lists, in order; [] for the generated default
        dataset. Pure string parsing (no file is read)."""
        return parse_source_specs(self.spec)

    def split_settings(self) -> dict[str, object]:
        """What the split depends on besides the data; a previous assignment made with
        other settings is not reused. ``holdout_source`` only when set, so assignments
        made before it existed keep being reused."""
        out: dict[str, object] = {"fractions": dict(sorted(self.split_fractions.items())),
                                  "seed": self.split_seed,
                                  "rule": self.near_duplicate_rule().model_dump()}
        if self.holdout_source is not None:
            out["holdout_source"] = self.holdout_source
        return out


class TrainerResource(dg.ConfigurableResource, TrainerConfig):
    """Training settings. Every field, with its default, bounds, description and
    validators, is TrainerConfig's own (inherited, not re-declared), so the launchpad shows
    them all and refuses what TrainerConfig refuses; ``core`` stays free of dagster."""

    def to_config(self) -> TrainerConfig:
        return TrainerConfig(**{name: getattr(self, name) for name in TrainerConfig.model_fields})


class ExitPolicyResource(dg.ConfigurableResource):
    """How the exit policies are fitted, which one the bundle ships, and how the test
    report's validator simulator scores what it serves."""

    alpha: float = Field(0.02, gt=0, lt=1, description="target false-negative rate")
    delta: float = Field(0.1, gt=0, lt=1, description="LTT failure probability")
    guarantee: Literal["crc", "ltt"] = "crc"
    calib_fit_fraction: float = Field(0.5, gt=0, lt=1)
    softmax_mode: Literal["two_way", "three_way"] = Field(
        "three_way", description="three_way: positive above t_hi, negative below t_lo, "
        "defer between; two_way: one threshold, nothing deferred")
    positive_fdr: float = Field(0.05, gt=0, lt=1, description="target share of negatives "
                                "among positive exits (three_way t_hi)")
    bundle_policy: Literal["cascade", "softmax", "gate", "scrc"] = Field(
        "cascade", description="the ONE policy the bundle ships: cascade (stage 1 exits the "
        "confident, stage 2 decides the rest, FNR <= alpha over the composed decision) or a "
        "stage-1-only policy (softmax | gate | scrc; its deferrals are emitted as roadwork)")
    latency_budget_s: float = Field(
        1.0, gt=0, description="cascade: per-image latency budget (stage 1 + routing rate x "
        "stage 2), well under the validator's 9 s; among certified configurations the best "
        "estimated reward within it is served")
    latency_stage1_s: float | None = Field(
        None, ge=0, description="cascade: stage 1's per-image latency; None = measured at fit "
        "time on this machine (batch 1, median)")
    latency_stage2_s: float | None = Field(
        None, ge=0, description="cascade: stage 2's per-image latency; None = measured")
    cascade_alphas: list[float] = Field(
        [0.01, 0.02, 0.05, 0.1, 0.15, 0.2], description="the alpha frontier: the cascade "
        "refitted at each alpha to show what it costs in reward ([] skips it)")
    conformal_alpha: float = Field(0.05, gt=0, lt=1, description="1 - set coverage")
    gate_risk: float = Field(0.02, gt=0, lt=1, description="target error among accepted")
    export_onnx: bool = True
    validator_images: int = Field(
        600, ge=0, description="test_report's StreetVision validator simulator: at most this "
        "many val_test images (a seeded subsample of whole groups), each decoded, augmented "
        "and predicted at L0-L3; cost is linear in it: about 2 s per image (all four levels) "
        "for a 12 MP photo on one CPU core, 0.3 s for a 2 MP frame, 5 ms for a 64 px one, "
        "plus the model; 0 = skip the simulator")
    validator_flips: bool = Field(
        True, description="the simulated validator flips with p = 0.5 each, as its docs say "
        "(False: as its code runs today, never)")
    validator_seed: int = Field(0, description="seed of the subsample and the augmentations")
    explain_failures: int = Field(
        6, ge=0, description="test_report: heatmaps (Grad-CAM for a CNN, attention rollout "
        "for a ViT) of this many of the worst val_test failures, false negatives first; "
        "0 = none")

    def to_config(self) -> PolicyFitConfig:
        """The fitting settings as core reads them (`bundle_policy` and `export_onnx`
        are about the bundle, `validator_*` about the test report, not the fit); the rest
        keep PolicyFitConfig's defaults."""
        return PolicyFitConfig(
            alpha=self.alpha, delta=self.delta, guarantee=self.guarantee,
            fit_fraction=self.calib_fit_fraction, mode=self.softmax_mode,
            positive_fdr=self.positive_fdr, conformal_alpha=self.conformal_alpha,
            gate_risk=self.gate_risk,
        )

    def cascade_config(self, latency_stage1_s: float, latency_stage2_s: float) -> CascadeConfig:
        """The cascade's settings as core reads them, with each stage's latency (measured
        or configured: the caller decides, `latency_stage*_s` set here win)."""
        return CascadeConfig(
            alpha=self.alpha, fit_fraction=self.calib_fit_fraction,
            latency_stage1_s=latency_stage1_s, latency_stage2_s=latency_stage2_s,
            latency_budget_s=self.latency_budget_s, alphas=tuple(self.cascade_alphas))


def env_settings(environ: dict[str, str] | None = None) -> dict[str, dict[str, tuple]]:
    """The fields environment variables set: {group: {field: (value, "ENV_VAR")}}.

    The one place env vars become settings; ``definitions.resources_from_env`` and
    ``roadwork run`` (``defs.settings.resolve_settings``) both read it."""
    env = os.environ if environ is None else environ
    out: dict[str, dict[str, tuple]] = {"dataset": {}, "trainer": {}, "exit_policy": {}}
    if env.get("ROADWORK_DATA"):
        out["dataset"]["spec"] = (env["ROADWORK_DATA"], "ROADWORK_DATA")
    if env.get("ROADWORK_WEIGHTS"):
        out["trainer"].update(
            mode=("frozen", "ROADWORK_WEIGHTS"),
            weights_path=(env["ROADWORK_WEIGHTS"], "ROADWORK_WEIGHTS"),
            backbone=(env.get("ROADWORK_BACKBONE") or DEFAULT_FROZEN_BACKBONE,
                      "ROADWORK_BACKBONE" if env.get("ROADWORK_BACKBONE") else "ROADWORK_WEIGHTS"),
            img_size=(224, "ROADWORK_WEIGHTS"))
    return out
