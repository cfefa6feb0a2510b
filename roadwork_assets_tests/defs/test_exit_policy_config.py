"""ExitPolicyResource.to_config(): every fit setting of the launchpad reaches core."""

from __future__ import annotations

from roadwork_assets.core.calibration.policy_config import PolicyFitConfig
from roadwork_assets.defs.resources import ExitPolicyResource

RENAMED = {"calib_fit_fraction": "fit_fraction", "softmax_mode": "mode"}
BUNDLE_ONLY = {"bundle_policy", "export_onnx"}
REPORT_ONLY = {"validator_images", "validator_flips", "validator_seed",  # test_report's
               "explain_failures"}
CASCADE_ONLY = {"latency_budget_s", "latency_stage1_s", "latency_stage2_s", "cascade_alphas"}


def test_to_config_maps_every_fit_setting():
    res = ExitPolicyResource(alpha=0.03, delta=0.2, guarantee="ltt", calib_fit_fraction=0.4,
                             softmax_mode="two_way", positive_fdr=0.07, conformal_alpha=0.06,
                             gate_risk=0.04)
    cfg = res.to_config()
    assert isinstance(cfg, PolicyFitConfig)
    for field in ExitPolicyResource.model_fields:
        if field not in BUNDLE_ONLY | REPORT_ONLY | CASCADE_ONLY:
            assert getattr(cfg, RENAMED.get(field, field)) == getattr(res, field), field
    # what the resource does not set keeps core's default
    assert cfg.conformal_method == PolicyFitConfig().conformal_method


def test_default_resource_gives_the_settings_the_assets_always_used():
    cfg = ExitPolicyResource().to_config()
    assert (cfg.alpha, cfg.delta, cfg.guarantee, cfg.fit_fraction, cfg.mode, cfg.positive_fdr,
            cfg.conformal_alpha, cfg.gate_risk) == (0.02, 0.1, "crc", 0.5, "three_way", 0.05, 0.05, 0.02)


def test_cascade_config_maps_the_cascade_settings_and_the_shared_ones():
    res = ExitPolicyResource(alpha=0.05, calib_fit_fraction=0.4, latency_budget_s=0.3,
                             cascade_alphas=[0.05, 0.1])
    cfg = res.cascade_config(0.01, 0.2)
    assert (cfg.alpha, cfg.fit_fraction, cfg.latency_budget_s, cfg.alphas) == (
        0.05, 0.4, 0.3, (0.05, 0.1))
    assert (cfg.latency_stage1_s, cfg.latency_stage2_s) == (0.01, 0.2)
    # the default budget is well under the validator's 9 s
    assert ExitPolicyResource().cascade_config(0.01, 0.1).latency_budget_s <= 1.0
