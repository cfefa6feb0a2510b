"""test_report's per-source table on the whole graph (the session's tiny generated
dataset: one source, named "default"): in the JSON artifact and in the UI metadata."""

from __future__ import annotations

from roadwork_assets.contracts.schemas import TestReport, load_json_artifact
from roadwork_assets.core.artifacts import ArtifactRegistry


def test_report_per_source_table_matches_the_overall_numbers(materialized_root):
    root, _, results = materialized_root
    report = load_json_artifact(ArtifactRegistry(root).test_report, TestReport)
    assert report.schema_version == 4
    (row,) = report.per_source
    assert row.source == "default"
    assert (row.n_images, row.n_positive) == (report.n_images, report.n_positive)
    assert row.confusion_matrix == report.confusion_matrix
    assert (row.fnr.errors, row.fnr.n) == (report.fnr.errors, report.fnr.n)
    assert abs(row.mcc - report.mcc) < 1e-12
    mats = [e.materialization for r in results for e in r.get_asset_materialization_events()
            if e.asset_key.to_user_string() == "test_report"]
    assert "| default |" in mats[-1].metadata["per_source"].value
