"""The split-read ledger under ``dg.multiprocess_executor``: every step in its own
process, against a persistent DAGSTER_HOME instance and a loadable code location
(``multiprocess_location``).

The ledger (``defs.split_reads``) is a per-process list that each asset drains at the
end of its body. In-process, steps share one process and run one at a time; here each
step runs in a fresh process, several steps of one run in parallel. What each asset
records must still be exactly what its declared inputs loaded: no read lost (recorded in
the parent process instead of the step's), none leaked between concurrent steps.
"""

from __future__ import annotations

import dagster as dg
import pytest

from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.defs.split_reads import SPLIT_READS_CHECK, drain_reads
from roadwork_assets_tests.integration.multiprocess_location import tiny_job, tiny_shard_job

SPLITS_NEEDED = ("train", "val_select", "val_calib")  # checkpoint fits on two, logits[val_calib]
N_SHARDS = 2  # embeddings per split x shard: each shard's run in its own processes
# (assets, partition) runs of the slice split_manifest -> embeddings -> checkpoint ->
# logits -> the stage-1 policies, each one multiprocess run
SLICE = [(("source_images", "split_assignment"), None),
         *((("split_manifest",), split) for split in SPLITS_NEEDED),
         *((("embeddings",), f"{k}|{split}") for split in SPLITS_NEEDED for k in range(N_SHARDS)),
         (("adapted_backbone", "checkpoint"), None),
         (("logits",), "val_calib"),
         (("thresholds", "gate_params", "conformal_sets"), None)]


@pytest.fixture(scope="module")
def slice_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    (tmp / "dagster").mkdir()
    (tmp / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("ROADWORK_HOME", str(tmp / "home"))  # the step processes build resources from it
    mp.setenv("ROADWORK_EMBEDDING_SHARDS", str(N_SHARDS))  # ... and their definitions
    mp.delenv("ROADWORK_DATA", raising=False)
    mp.delenv("ROADWORK_WEIGHTS", raising=False)
    drain_reads()
    runs = []
    try:
        with dg.DagsterInstance.from_config(str(tmp / "dagster")) as instance:
            for assets, partition in SLICE:
                job = tiny_shard_job if assets == ("embeddings",) else tiny_job
                result = dg.execute_job(
                    dg.reconstructable(job), instance,
                    asset_selection=[dg.AssetKey(a) for a in assets],
                    tags={"dagster/partition": partition} if partition else None)
                assert result.success, (assets, partition, _failure(instance, result.run_id))
                runs.append((assets, partition, result.run_id))
            yield instance, runs, drain_reads()
    finally:
        mp.undo()


def _failure(instance: dg.DagsterInstance, run_id: str) -> str:
    failures = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return "; ".join(str(r.get_dagster_event().event_specific_data.error.message)[:500]
                     for r in failures)


def _materialization(instance, run_id: str, asset: str) -> dict:
    (record,) = [r for r in instance.all_logs(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if r.get_dagster_event().asset_key == dg.AssetKey(asset)]
    meta = record.get_dagster_event().event_specific_data.materialization.metadata
    return {k: v.value for k, v in meta.items()}


def test_every_step_ran_in_its_own_process(slice_runs):
    instance, runs, parent_reads = slice_runs
    for assets, _partition, run_id in runs:
        starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        pids = {r.get_dagster_event().step_key: r.get_dagster_event().pid for r in starts}
        assert set(pids) == set(assets)
        assert len(set(pids.values())) == len(assets), pids  # one process per step
        (run_start,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
        assert run_start.get_dagster_event().pid not in pids.values()  # none in the parent
    # every load happened in a step process: the test process recorded none
    assert parent_reads == []


def test_each_asset_records_exactly_what_it_read(slice_runs):
    instance, runs, _ = slice_runs
    by_key = {(a, p): run_id for assets, p, run_id in runs for a in assets}
    for split in SPLITS_NEEDED:
        for k in range(N_SHARDS):
            emb = _materialization(instance, by_key[("embeddings", f"{k}|{split}")], "embeddings")
            assert emb["splits_read"] == [split]
            assert emb["partitions_read"] == [f"split_manifest[{split}]"]
            assert (emb["shard"], emb["n_shards"]) == (k, N_SHARDS)
        manifest = _materialization(instance, by_key[("split_manifest", split)],
                                    "split_manifest")
        # split_assignment holds every split's rows: a load of it counts as all four
        assert manifest["partitions_read"] == sorted(f"split_assignment[{s}]" for s in SPLITS)
    ckpt = _materialization(instance, by_key[("checkpoint", None)], "checkpoint")
    assert ckpt["splits_read"] == ["train", "val_select"]
    # every shard read is in the ledger as it is; the rules judge each as its split
    assert ckpt["partitions_read"] == ["adapted_backbone", "embeddings[0|train]",
                                       "embeddings[0|val_select]", "embeddings[1|train]",
                                       "embeddings[1|val_select]"]
    logits = _materialization(instance, by_key[("logits", "val_calib")], "logits")
    assert logits["splits_read"] == ["val_calib"]
    assert logits["partitions_read"] == ["checkpoint", "embeddings[0|val_calib]",
                                         "embeddings[1|val_calib]", "split_manifest[val_calib]"]
    # three policies ran concurrently (max_concurrent 2): none took another's reads
    for policy in ("thresholds", "gate_params", "conformal_sets"):
        meta = _materialization(instance, by_key[(policy, None)], policy)
        assert meta["partitions_read"] == ["logits[val_calib]"], policy
        # taint through the whole code location's graph, not "lineage unknown"
        via = f"{policy} <- logits[val_calib]"
        assert meta["splits_carried"] == {
            "train": f"{via} <- checkpoint <- embeddings[0|train]",
            "val_calib": via,
            "val_select": f"{via} <- checkpoint <- embeddings[0|val_select]"}, policy


def test_every_split_reads_check_passed(slice_runs):
    instance, runs, _ = slice_runs
    seen = set()
    for _assets, _partition, run_id in runs:
        for record in instance.all_logs(
                run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
            ev = record.get_dagster_event().event_specific_data
            assert ev.passed, (ev.asset_key, ev.check_name, ev.description)
            if ev.check_name == SPLIT_READS_CHECK:
                seen.add(ev.asset_key.to_user_string())
    assert seen == {a for assets, _, _ in runs for a in assets}
