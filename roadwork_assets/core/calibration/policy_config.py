"""The settings of an exit-policy fit, in one validated object (`PolicyFitConfig`).

`core.calibration.policies.fit_policy(kind, view_logits, labels, image_ids,
groups=..., config=...)` takes the data in the call and the settings here, as
MAPIE and scikit-learn estimators do; `defs.resources.ExitPolicyResource.to_config()`
produces one from the launchpad settings.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from roadwork_assets.contracts.policy_schemas import CalibratorMethod
from roadwork_assets.core.calibration.calibrators import CALIBRATORS

DEFAULT_CALIBRATOR_METHODS: tuple[str, ...] = tuple(CALIBRATORS)


class PolicyFitConfig(BaseModel):
    """How a policy is fitted on val_calib; every kind reads the stage-1 settings.

    Stage 1 (all kinds): `fit_fraction` of val_calib fits the calibrator (chosen among
    `calibrator_methods` by NLL on a `holdout_fraction` held-out part, ECE in `n_bins`
    bins reported), the rest fits t_lo with `guarantee` "crc" (E[FNR] <= `alpha`) or
    "ltt" (P(FNR <= alpha) >= 1 - `delta`, `fwer` over `grid`) on view `main_view`.
    softmax: `mode` three_way adds an LTT-certified positive exit at FDR `positive_fdr`.
    gate: a failure gate (L2 logistic, `gate_C`) with target error `gate_risk` among
    accepted images. scrc: `conformal_method` sets at miscoverage `conformal_alpha`.
    `context` names the data in the guarantee statement and in error messages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.02, gt=0, lt=1)
    delta: float = Field(0.1, gt=0, lt=1)
    guarantee: Literal["crc", "ltt"] = "crc"
    calibrator_methods: tuple[CalibratorMethod, ...] = DEFAULT_CALIBRATOR_METHODS  # type: ignore[assignment]
    mode: Literal["two_way", "three_way"] = "two_way"
    positive_fdr: float = Field(0.05, gt=0, lt=1)
    gate_risk: float = Field(0.05, gt=0, lt=1)
    gate_C: float = Field(1.0, gt=0)
    conformal_alpha: float = Field(0.1, gt=0, lt=1)
    conformal_method: Literal["lac", "mondrian"] = "mondrian"
    fwer: Literal["fixed_sequence", "bonferroni"] = "fixed_sequence"
    grid: tuple[float, ...] | None = None  # LTT thresholds; None: risk_control.DEFAULT_GRID
    fit_fraction: float = Field(0.5, gt=0, lt=1)
    holdout_fraction: float = 0.3
    n_bins: int = Field(15, ge=1)
    main_view: int = Field(0, ge=0)
    context: str = "val_calib"

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_as_tuple(cls, value: Any) -> Any:
        # an array (or any sequence) of thresholds, kept as plain floats
        return None if value is None else tuple(np.asarray(value, dtype=np.float64).ravel().tolist())
