"""Schemas of the StreetVision validator simulation (``core.evaluation.validator``) and of
the section of the test report that carries it (``TestReport.validator``).

They live in ``contracts`` because the test report (a JSON artifact) embeds them; the
simulator in ``core`` builds them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RewardEstimate(_Frozen):
    """Validator reward per challenge at steady state (windows full), simulated."""

    mean: float  # average over simulated windows
    ci_low: float  # normal 95 % interval of the Monte-Carlo mean (simulation error only)
    ci_high: float
    n_windows: int
    expected: float | None  # closed form at the pooled TPR/TNR (None if answers invalid)
    mcc: float  # max(0, MCC) of all answers pooled (binarised, valid only)
    accuracy: float  # balanced: labels are drawn 50/50, so (TPR + TNR) / 2
    tpr: float
    tnr: float
    invalid_rate: float
    n_positive: int
    n_negative: int
    note: str = ("interval = Monte-Carlo error of the window simulation; it does not cover "
                 "the sampling error of the finite test set")


class LevelMetrics(_Frozen):
    level: int
    n: int
    n_positive: int
    n_negative: int
    n_invalid: int
    mcc: float  # sklearn MCC of the binarised answers (not clamped), 0 if one class
    accuracy: float
    balanced_accuracy: float
    tpr: float
    tnr: float


class ValidatorReport(_Frozen):
    seed: int
    levels: list[int]
    flips: bool
    n_images: int
    per_level: list[LevelMetrics]
    reward: RewardEstimate  # levels drawn uniformly from `levels`, as the validator does
    method: str = ("StreetVision validator simulation: each image once per level "
                   "(augment -> JPEG q75 224x224 -> predict_fn -> np.round at 0.5); "
                   "reward = (0.5 MCC@100 + 0.5 acc@10)^3 over windows whose labels are "
                   "drawn 50/50 and answers resampled from the pooled (image, level) answers "
                   "of that class")


class ValidatorRow(_Frozen):
    """One served configuration, scored by the simulated validator."""

    name: str  # cascade_served, stage1_served, single_view_0.5, stage2_0.5
    description: str
    per_level: list[LevelMetrics]
    reward: RewardEstimate


class ValidatorSimulation(_Frozen):
    """The validator simulator on (a seeded, by-group subsample of) val_test: every row
    answered the same augmented images."""

    split: Literal["val_test"] = "val_test"
    seed: int
    levels: list[int]
    flips: bool = Field(description="validator flips applied with p = 0.5 each (upstream's "
                        "intent; its code as of 28a1755 never flips)")
    n_images: int = Field(description="val_test images the simulator used")
    n_positive: int
    n_available: int = Field(description="val_test images there were")
    max_images: int = Field(description="the cap (exit_policy.validator_images)")
    n_groups: int = Field(description="groups (scenes / copies of a photo) sampled whole")
    seconds: float = Field(description="wall time: decode, augment, predict every row, score")
    seconds_per_answer: float = Field(
        description="seconds per (image, level) answer, all rows together")
    rows: list[ValidatorRow]
    skipped: dict[str, str] = Field(
        default_factory=dict, description="rows left out for this bundle, and why (e.g. no "
        "stage 2 in a stage-1 bundle)")
    method: str = ValidatorReport.model_fields["method"].default

    def row(self, name: str) -> ValidatorRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no validator row {name!r}; rows: {[r.name for r in self.rows]}")
