"""A failed blocking check stops `roadwork run` with one line naming the check, the
measured gap and the tolerance — no Dagster traceback — and a non-zero exit code."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.defs import runner

DESCRIPTION = "served probability gap 7.30e-03 vs tolerance 2.10e-04 (probe image 3)"


@dg.asset(check_specs=[dg.AssetCheckSpec("parity", asset="toy", blocking=True),
                       dg.AssetCheckSpec("advisory", asset="toy", blocking=False)])
def toy():
    yield dg.Output(1)
    yield dg.AssetCheckResult(check_name="parity", passed=False, description=DESCRIPTION)
    yield dg.AssetCheckResult(check_name="advisory", passed=False, description="not blocking")


@dg.asset(deps=[toy])
def downstream():
    raise AssertionError("must not run after a failed blocking check")


TOY_DEFS = dg.Definitions(assets=[toy, downstream])


def test_failed_blocking_check_becomes_one_line_error():
    job = TOY_DEFS.resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance, \
            pytest.raises(runner.BlockingCheckFailed) as err:
        runner.run_stage(job, instance, [dg.AssetKey("toy"), dg.AssetKey("downstream")],
                         None, None)
    assert str(err.value) == f"blocking check toy:parity failed: {DESCRIPTION}"


def test_other_errors_pass_through_unchanged():
    from roadwork_assets.contracts.errors import BadInputError

    @dg.asset
    def broken():
        raise BadInputError("images/x.jpg is not an image: remove it")

    job = dg.Definitions(assets=[broken]).resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance, \
            pytest.raises(BadInputError, match="remove it"):
        runner.run_stage(job, instance, [dg.AssetKey("broken")], None, None)


def test_roadwork_run_prints_one_line_and_exits_nonzero(tmp_path, monkeypatch, capfd):
    from roadwork_assets import cli, definitions

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(definitions, "defs", TOY_DEFS)  # its stages follow from its graph
    code = cli.main(["run"])
    out, err = capfd.readouterr()
    assert code != 0
    assert err.strip().splitlines() == [
        f"roadwork run: error: blocking check toy:parity failed: {DESCRIPTION}"]
    assert "Traceback" not in out + err and "DagsterAssetCheckFailedError" not in out + err


def test_stages_follow_the_asset_graph(tmp_path):
    """Topological levels, consecutive levels of one kind merged: the five stages
    `roadwork run` has always run, in the same order."""
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets_tests.conftest import tiny_resources

    assert runner.stages(build_definitions(tiny_resources(tmp_path))) == (
        runner.Stage(("source_images", "split_assignment"), partitioned=False),
        runner.Stage(("split_manifest", "embeddings"), partitioned=True),
        runner.Stage(("adapted_backbone", "checkpoint"), partitioned=False),
        runner.Stage(("logits", "multiview_views"), partitioned=True),
        runner.Stage(("multiview_checkpoint", "thresholds", "gate_params", "conformal_sets"),
                     partitioned=False),
        runner.Stage(("multiview_logits",), partitioned=True),
        runner.Stage(("cascade_policy", "bundle", "test_report", "drift", "label_queue"),
                     partitioned=False),
    )
    assert runner.stages(TOY_DEFS) == (runner.Stage(("toy", "downstream"), partitioned=False),)
