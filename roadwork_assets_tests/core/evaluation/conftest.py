"""Fixtures for the report, the comparison rows and the cascade plots: real policies
fitted on synthetic logits with a known structure, and a tiny real model in a real bundle.

Synthetic scenes: all-roadwork or all-none, m frames each; frames of a scene share a
latent z_g, so stage 1 (logit diff ±1.5 + z_g + ε) and stage 2 (±1.5 + z_g + 0.5 ε) are
correlated, stage 2 less noisy."""

from __future__ import annotations

import numpy as np
import pytest

from roadwork_assets.core.calibration.cascade import CascadeConfig, fit_cascade_policy
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.core.calibration.policy_config import PolicyFitConfig

LAT1, LAT2 = 0.02, 0.2


def synthetic_logits(seed: int, n_scenes: int = 240, m: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_scene = rng.integers(0, 2, n_scenes)
    y = np.repeat(y_scene, m)
    z = np.repeat(rng.normal(size=n_scenes), m)
    sign = 2.0 * y - 1.0
    s1 = 1.5 * sign + z + rng.normal(size=y.size)
    s2 = 1.5 * sign + z + 0.5 * rng.normal(size=y.size)
    views = np.zeros((y.size, 2, 2))
    views[:, 0, 1] = s1
    views[:, 1, 1] = s1 + 0.3 * rng.normal(size=y.size)
    stage2 = np.stack([np.zeros(y.size), s2], axis=1)
    return {"views": views, "stage2": stage2, "labels": y,
            "ids": np.array([f"i{seed}_{k}" for k in range(y.size)]),
            "groups": np.array([f"g{seed}_{k // m}" for k in range(y.size)])}


def cascade_config(**over) -> CascadeConfig:
    base = {"alpha": 0.1, "latency_stage1_s": LAT1, "latency_stage2_s": LAT2,
            "latency_budget_s": 0.5, "alphas": (0.01, 0.05, 0.1, 0.2), "n_lambda": 41}
    return CascadeConfig(**(base | over))


@pytest.fixture(scope="session")
def calib_and_test():
    return synthetic_logits(1), synthetic_logits(2)


@pytest.fixture(scope="session")
def fitted_policies(calib_and_test):
    """(cascade params, thresholds softmax params), both fitted on the calib draw."""
    c, _ = calib_and_test
    cascade = fit_cascade_policy(c["views"], c["stage2"], c["labels"], c["ids"], c["groups"],
                                 policy=PolicyFitConfig(alpha=0.1), cascade=cascade_config())
    softmax = fit_policy("softmax", c["views"], c["labels"], c["ids"], groups=c["groups"],
                         alpha=0.1)
    return cascade, softmax
