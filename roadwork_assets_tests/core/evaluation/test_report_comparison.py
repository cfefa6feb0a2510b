"""test_report's numbers for a cascade bundle (val_test logits + stage-2 logits): the
served cascade, the four-row comparison, routing and latency, the price of the guarantee,
the schema version, and the lines `roadwork run` prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError
from roadwork_assets.contracts.schemas import Provenance, TestReport, validate_artifact
from roadwork_assets.core.calibration.cascade import apply_cascade, cascade_stage2_probability
from roadwork_assets.core.calibration.metrics import mcc
from roadwork_assets.core.calibration.policies import apply_policy, policy_probability
from roadwork_assets.core.evaluation.comparison import comparison_table
from roadwork_assets.core.evaluation.report import evaluate_bundle_policy
from roadwork_assets.core.evaluation.validator import binarise, expected_reward
from roadwork_assets.core.evaluation.validator_rows import closing_lines, simulate_rows
from roadwork_assets_tests.core.evaluation.conftest import LAT1, LAT2

PROV = Provenance(data_version="d", code_version="c", created_at="t")
ROW_NAMES = ["cascade_served", "stage1_served", "single_view_0.5", "stage2_0.5"]


def _fnr(decision, y):
    pos = y == 1
    return int(np.sum(pos & (decision == 0))), int(pos.sum())


@pytest.fixture(scope="module")
def cascade_report(calib_and_test, fitted_policies):
    _, t = calib_and_test
    cascade, softmax = fitted_policies
    report, arrays = evaluate_bundle_policy(
        cascade, t["views"], t["labels"], bundle_id="b1", provenance=PROV, n_bootstrap=50,
        stage2_logits=t["stage2"][:, None, :], stage1_policy=softmax)
    return report, arrays


def test_cascade_row_is_apply_cascade_and_its_served_probability_binarises_to_it(
        cascade_report, calib_and_test, fitted_policies):
    report, arrays = cascade_report
    _, t = calib_and_test
    cascade, _ = fitted_policies
    y = t["labels"]
    decision, served, stage = apply_cascade(cascade, t["views"], t["stage2"])
    assert np.array_equal(binarise(served), decision)
    assert np.array_equal(arrays["decision"], decision) and np.array_equal(arrays["stage"], stage)
    row = report.row("cascade_served")
    k, n = _fnr(decision, y)
    assert (row.fnr.errors, row.fnr.n) == (k, n) and row.fnr.value == pytest.approx(k / n)
    assert row.fnr.ci_low <= k / n <= row.fnr.ci_high
    # the report's headline numbers are the cascade as served
    assert (report.fnr.errors, report.fnr.n) == (k, n)
    assert report.mcc == pytest.approx(mcc(y, decision)) == pytest.approx(row.mcc)
    assert report.accuracy == pytest.approx(np.mean(decision == y)) == pytest.approx(row.accuracy)
    assert report.policy_kind == "cascade" and report.policy_defer_rate == 0.0
    assert 0 < np.sum(stage == 2) < y.size  # the fixture routes some images, not all


def test_routing_and_latency_per_stage(cascade_report, fitted_policies):
    report, arrays = cascade_report
    cascade, _ = fitted_policies
    c = report.cascade
    routed = np.mean(arrays["stage"] == 2)
    assert c.routing_rate == pytest.approx(routed) and c.n_routed == int(np.sum(arrays["stage"] == 2))
    assert report.row("cascade_served").routing_rate == pytest.approx(routed)
    assert (c.latency_stage1_s, c.latency_stage2_s) == (LAT1, LAT2)
    assert c.expected_latency_s == pytest.approx(LAT1 + routed * LAT2)
    assert c.latency_budget_met == (c.expected_latency_s <= cascade.latency_budget_s)
    assert c.policy_routing_rate == cascade.routing_rate and c.alpha == cascade.alpha


def test_four_rows_in_order_each_recomputed_from_its_definition(
        cascade_report, calib_and_test, fitted_policies):
    report, _ = cascade_report
    _, t = calib_and_test
    cascade, softmax = fitted_policies
    y = t["labels"]
    assert [r.name for r in report.comparison] == ROW_NAMES and report.skipped_rows == {}
    expected = {
        "stage1_served": binarise(apply_policy(softmax, t["views"])[1]),
        "single_view_0.5": binarise(policy_probability(cascade, t["views"])),
        "stage2_0.5": binarise(cascade_stage2_probability(cascade, t["stage2"])),
    }
    for name, d in expected.items():
        row = report.row(name)
        k, n = _fnr(d, y)
        assert (row.fnr.errors, row.fnr.n, row.n) == (k, n, y.size), name
        assert row.mcc == pytest.approx(mcc(y, d)), name
        tpr, tnr = np.mean(d[y == 1] == 1), np.mean(d[y == 0] == 0)
        assert row.reward == pytest.approx(expected_reward(tpr, tnr)), name
    assert report.row("stage1_served").routing_rate is None


def test_price_of_the_guarantee_is_reference_minus_served(cascade_report):
    report, _ = cascade_report
    price = report.price_of_guarantee
    ref, srv = report.row("single_view_0.5"), report.row("cascade_served")
    assert (price.reference, price.served) == ("single_view_0.5", "cascade_served")
    assert price.mcc_gap == pytest.approx(ref.mcc - srv.mcc)
    assert price.reward_gap == pytest.approx(ref.reward - srv.reward)
    assert price.validator_reward_gap is None  # simulator off
    assert price.fnr_served == srv.fnr.value


def test_report_is_schema_3_and_a_v2_report_is_refused_clearly(cascade_report):
    report, _ = cascade_report
    raw = json.loads(report.model_dump_json())
    assert raw["schema_version"] == 4
    assert validate_artifact(raw, TestReport, "test_report") == report
    with pytest.raises(ArtifactIntegrityError, match=r"schema_version 2 is not supported.*re-materialize"):
        validate_artifact(raw | {"schema_version": 2}, TestReport, "test_report")


def test_stage1_bundle_keeps_its_path_and_leaves_the_stage2_rows_out(calib_and_test,
                                                                    fitted_policies):
    _, t = calib_and_test
    _, softmax = fitted_policies
    report, arrays = evaluate_bundle_policy(softmax, t["views"], t["labels"], bundle_id="b0",
                                            provenance=PROV, n_bootstrap=50)
    decision, emitted = apply_policy(softmax, t["views"])
    assert np.array_equal(arrays["emitted"], emitted)
    assert np.array_equal(arrays["decision"], decision) and report.cascade is None
    assert [r.name for r in report.comparison] == ["stage1_served", "single_view_0.5"]
    assert set(report.skipped_rows) == {"cascade_served", "stage2_0.5"}
    assert "stage-1 bundle has no stage 2" in report.skipped_rows["stage2_0.5"]
    assert report.mcc == pytest.approx(report.row("stage1_served").mcc)
    assert report.price_of_guarantee.served == "stage1_served"
    assert report.model_balanced_accuracy == pytest.approx(
        report.row("single_view_0.5").balanced_accuracy)


def test_cascade_without_stage2_logits_is_refused_and_without_thresholds_skips_a_row(
        calib_and_test, fitted_policies):
    _, t = calib_and_test
    cascade, _ = fitted_policies
    with pytest.raises(BadInputError, match="stage-2 logits"):
        evaluate_bundle_policy(cascade, t["views"], t["labels"], bundle_id="b", provenance=PROV,
                               n_bootstrap=20)
    report, _ = evaluate_bundle_policy(cascade, t["views"], t["labels"], bundle_id="b",
                                       provenance=PROV, n_bootstrap=20,
                                       stage2_logits=t["stage2"])
    assert "stage1_served" in report.skipped_rows
    assert [r.name for r in report.comparison] == ["cascade_served", "single_view_0.5",
                                                   "stage2_0.5"]
    table = comparison_table(report.comparison, report.skipped_rows)
    assert table.count("\n| ") == 3 and "stage1_served: left out" in table


def _sim_with_rows(tmp_path, names):
    from PIL import Image

    labels = np.array([0, 1] * 4)
    uris = []
    for k, y in enumerate(labels):
        path = tmp_path / f"{k}.png"
        Image.fromarray(np.full((32, 32, 3), 40 + 190 * y, np.uint8)).save(path)
        uris.append(str(path))
    fns = {n: (n, lambda ims: np.full(len(ims), 0.7)) for n in names}
    return simulate_rows(uris, [f"i{k}" for k in range(8)], labels, [f"g{k}" for k in range(8)],
                         fns, max_images=8, n_windows=200)


def test_closing_lines_name_the_served_cascade_and_every_validator_row(cascade_report, tmp_path):
    report, _ = cascade_report
    lines = closing_lines(json.loads(report.model_dump_json()))
    served = lines[0]
    fnr = report.fnr
    assert served.startswith("val_test, the cascade as served at 0.5: MCC ")
    assert f"FNR {fnr.value:.4f} ({fnr.errors}/{fnr.n}, 95% CI [{fnr.ci_low:.4f}, " in served
    c = report.cascade
    assert f"routed to stage 2: {c.routing_rate:.1%} ({c.n_routed}/{report.n_images})" in served
    assert f"stage 1 {1000 * LAT1:.1f} ms" in served and f"stage 2 {1000 * LAT2:.1f} ms" in served
    assert lines[1].startswith("val_test at 0.5 (logits, closed-form reward): cascade_served MCC")
    assert all(n in lines[1] for n in ROW_NAMES)
    assert lines[2].startswith("price of the guarantee (single_view_0.5 minus cascade_served): MCC ")
    assert lines[-1] == "validator simulator off (exit_policy.validator_images = 0)"
    sim = _sim_with_rows(tmp_path, ROW_NAMES)
    with_sim = report.model_copy(update={"validator": sim})
    last = closing_lines(json.loads(with_sim.model_dump_json()))[-1]
    assert last.startswith("validator reward (simulated, L0-L3): cascade_served ")
    assert all(f"{n} " in last for n in ROW_NAMES)


def test_closing_lines_of_a_stage1_report_keep_the_old_lines(calib_and_test, fitted_policies):
    _, t = calib_and_test
    _, softmax = fitted_policies
    report, _ = evaluate_bundle_policy(softmax, t["views"], t["labels"], bundle_id="b0",
                                       provenance=PROV, n_bootstrap=20)
    lines = closing_lines(json.loads(report.model_dump_json()))
    assert lines[0].startswith("val_test, as served at 0.5: MCC ") and "deferred" in lines[0]
    assert lines[1].startswith("the calibrated model alone at 0.5 (no exit policy)")
    with pytest.raises(ArtifactIntegrityError, match="schema_version"):
        closing_lines(json.loads(report.model_dump_json()) | {"schema_version": 2})
