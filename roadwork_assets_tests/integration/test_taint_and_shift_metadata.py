"""On the real graph: every asset reports the splits it carries, and test_report states its
KS shift test against the val_calib scores stored in the policy (it never reads val_calib)."""

import json

from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import ArtifactRegistry


def _metadata(results, asset: str, partition: str | None = None):
    for result in results:
        for ev in result.get_asset_materialization_events():
            mat = ev.materialization
            if ev.asset_key.to_user_string() == asset and mat.partition == partition:
                return mat.metadata
    raise AssertionError(f"{asset}[{partition}] was not materialized")


def test_materializations_report_the_splits_they_carry(materialized_root):
    _, _, results = materialized_root
    carried = {(a, p): set(_metadata(results, a, p)["splits_carried"].value)
               for a, p in [("checkpoint", None), ("logits", "val_calib"), ("thresholds", None),
                            ("bundle", None), ("test_report", None)]}
    assert carried[("checkpoint", None)] == {"train", "val_select"}
    assert carried[("logits", "val_calib")] == {"train", "val_select", "val_calib"}
    assert carried[("thresholds", None)] == {"train", "val_select", "val_calib"}
    assert carried[("bundle", None)] == {"train", "val_select", "val_calib"}
    assert carried[("test_report", None)] == set(SPLITS)


def test_report_states_the_shift_test_and_its_warning(materialized_root):
    root, _, results = materialized_root
    report = json.loads(ArtifactRegistry(root).test_report.read_text())
    shift = report["score_shift"]
    assert [t["group"] for t in shift["tests"]] == ["positives", "negatives", "all"]
    for t in shift["tests"]:
        assert 0.0 <= t["statistic"] <= 1.0 and 0.0 <= t["p_value"] <= 1.0
        assert t["n_reference"] > 0 and t["n_test"] > 0
    assert report["shift_warning"] == shift["warning"]
    meta = _metadata(results, "test_report")
    text = meta["shift_warning"].value
    if shift["warning"]:
        assert text == shift["warning"]
    else:
        assert text == shift["note"] or text.startswith("none: no KS test rejects")
    assert "| positives |" in meta["score_shift"].value
