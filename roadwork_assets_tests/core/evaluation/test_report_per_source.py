"""test_report's per-source table: each source's served and policy numbers, which sum to
the overall ones, and the lookup of each logits row's source in split_manifest."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import Provenance, TestReport, validate_artifact
from roadwork_assets.core.calibration.metrics import mcc
from roadwork_assets.core.evaluation.report import (
    evaluate_bundle_policy,
    per_source_markdown,
    sources_of,
)

PROV = Provenance(data_version="d", code_version="c", created_at="t")


@pytest.mark.parametrize("which", ["cascade", "softmax"])
def test_per_source_numbers_sum_to_the_overall_ones(calib_and_test, fitted_policies, which):
    _, t = calib_and_test
    cascade, softmax = fitted_policies
    y = t["labels"]
    rng = np.random.default_rng(0)
    sources = rng.choice(np.array(["natix", "city", "dashcam"]), size=y.size, p=[0.5, 0.3, 0.2])
    kwargs = ({"stage2_logits": t["stage2"][:, None, :], "stage1_policy": softmax}
              if which == "cascade" else {})
    report, arrays = evaluate_bundle_policy(
        cascade if which == "cascade" else softmax, t["views"], y, bundle_id="b",
        provenance=PROV, n_bootstrap=20, sources=sources, **kwargs)
    rows = report.per_source
    assert [r.source for r in rows] == ["city", "dashcam", "natix"]
    assert sum(r.n_images for r in rows) == report.n_images == y.size
    assert sum(r.n_positive for r in rows) == report.n_positive
    assert (np.sum([r.confusion_matrix for r in rows], axis=0) == report.confusion_matrix).all()
    assert sum(r.fnr.errors for r in rows) == report.fnr.errors
    assert sum(r.fnr.n for r in rows) == report.fnr.n
    assert sum(r.policy_fnr.errors for r in rows) == report.policy_fnr.errors
    assert sum(r.policy_defer_rate * r.n_images for r in rows) == pytest.approx(
        report.policy_defer_rate * report.n_images)
    pred = (arrays["emitted"] > 0.5).astype(int)
    for r in rows:
        m = sources == r.source
        assert r.mcc == pytest.approx(mcc(y[m], pred[m]))
        assert r.accuracy == pytest.approx(np.mean(y[m] == pred[m]))
        assert r.fnr.ci_low <= r.fnr.value <= r.fnr.ci_high  # Clopper-Pearson around it
    table = per_source_markdown(report)
    assert table.count("\n") == 1 + len(rows) and "| natix |" in table
    # the JSON artifact carries it (schema 4) and reads back equal
    raw = report.model_dump(mode="json")
    assert raw["schema_version"] == 4 and len(raw["per_source"]) == 3
    assert validate_artifact(raw, TestReport, "test_report") == report


def test_without_sources_the_table_is_empty(calib_and_test, fitted_policies):
    _, t = calib_and_test
    _, softmax = fitted_policies
    report, _ = evaluate_bundle_policy(softmax, t["views"], t["labels"], bundle_id="b",
                                       provenance=PROV, n_bootstrap=20)
    assert report.per_source == [] and "one source" in per_source_markdown(report)


def test_sources_are_looked_up_by_item_id_and_a_stranger_is_refused():
    manifest = pd.DataFrame({"item_id": ["x", "y", "z"], "source": ["a", "b", "a"]})
    assert sources_of(manifest, np.array(["z", "x", "y"])).tolist() == ["a", "a", "b"]
    assert sources_of(manifest.drop(columns="source"), np.array(["x"])) is None
    with pytest.raises(ArtifactIntegrityError, match=r"\['w'\] that split_manifest"):
        sources_of(manifest, np.array(["x", "w"]))
