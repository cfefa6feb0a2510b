"""An artifact replaces the last good one only if its blocking checks passed."""

import dagster as dg

from roadwork_assets.core.artifacts import atomic_write_text, staged_path
from roadwork_assets.defs.promotion import StagedFiles, publish


def _check(passed: bool) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name="c", asset_key="a", passed=passed)


def test_failed_check_keeps_the_previous_artifact_and_sets_the_new_one_aside(tmp_path):
    dest = atomic_write_text(tmp_path / "thresholds.json", "good")
    staged = atomic_write_text(staged_path(dest), "bad")
    path, meta = publish(dg.build_asset_context(), StagedFiles.at(dest),
                         [_check(True), _check(False)])
    assert dest.read_text() == "good"
    assert path.name == "thresholds.json.rejected.json" and path.read_text() == "bad"
    assert meta["promoted"].value is False
    assert not staged.exists()


def test_passing_checks_promote(tmp_path):
    dest = atomic_write_text(tmp_path / "a.parquet", "old")
    atomic_write_text(staged_path(dest), "new")
    path, meta = publish(dg.build_asset_context(), StagedFiles.at(dest), [_check(True)])
    assert path == dest and dest.read_text() == "new" and meta["promoted"].value is True
