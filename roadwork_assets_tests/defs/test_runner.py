"""A failed blocking check stops `roadwork run` with one line naming the check, the
measured gap and the tolerance — no Dagster traceback — and a non-zero exit code."""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.splits import SPLITS
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
    """Topological levels, consecutive levels of one kind merged, in the order `roadwork
    run` has always run them; embeddings (split x shard) is its own stage, after the
    split manifests, run once per shard of each split."""
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets_tests.conftest import tiny_resources

    split, shard, none = runner.KIND_SPLIT, runner.KIND_SHARD, runner.KIND_UNPARTITIONED
    for n in (1, 3):
        defs = build_definitions(tiny_resources(tmp_path), n_shards=n)
        plan = runner.stages(defs)
        assert plan == (
            runner.Stage(("source_images", "split_assignment"), none),
            runner.Stage(("split_manifest",), split),
            runner.Stage(("embeddings",), shard),
            runner.Stage(("adapted_backbone", "checkpoint"), none),
            runner.Stage(("logits", "multiview_views"), split),
            runner.Stage(("multiview_checkpoint", "thresholds", "gate_params", "conformal_sets"),
                         none),
            runner.Stage(("multiview_logits",), split),
            runner.Stage(("cascade_policy", "bundle", "test_report", "drift", "label_queue"),
                         none),
        )
        assert runner.stage_partitions(defs, plan[1]) == list(SPLITS)
        assert runner.stage_partitions(defs, plan[2]) == [
            f"{k}|{s}" for s in SPLITS for k in range(n)]
        assert runner.stage_partitions(defs, plan[0]) == [None]
    assert runner.stages(TOY_DEFS) == (runner.Stage(("toy", "downstream"), none),)


def test_dagster_commands_run_each_shard_of_each_split(tmp_path):
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets_tests.conftest import tiny_resources

    defs = build_definitions(tiny_resources(tmp_path), n_shards=2)
    commands = runner.dagster_commands(defs, extra=["--config-json", "{}"])
    embedding = [c for c in commands if c[c.index("--select") + 1] == "embeddings"]
    assert [c[c.index("--partition") + 1] for c in embedding] == [
        f"{k}|{s}" for s in SPLITS for k in range(2)]
    assert all(c[-2:] == ["--config-json", "{}"] for c in commands)
    assert len(commands) == 1 + 4 + 8 + 1 + 4 + 1 + 4 + 1
