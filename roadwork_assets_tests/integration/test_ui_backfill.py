""""Materialize all" in the UI, through the webserver's GraphQL API, to completion.

The UI's "Materialize all" over this graph is an asset backfill across the split
partitions (one run holds one partition; unpartitioned assets run once). This test
starts `roadwork ui` for real on a temporary DAGSTER_HOME (the project's dagster.yaml:
queued run coordinator, ForkserverRunLauncher; `dagster-webserver` and the daemon with
its 1 s backfill loop), launches that backfill with the `launchPartitionBackfill`
mutation the button sends (every asset `roadwork run` builds, all partitions), waits
for Dagster's backfill daemon to finish it, and checks that every asset was
materialized for every split, that every run forked from the preloaded code location,
and that the bundle verifies. Nothing in the path is replaced: the daemon, the run
queue and the run workers are Dagster's own.
"""

from __future__ import annotations

import time

from roadwork_assets_tests.integration import ui_driver
from roadwork_assets_tests.integration.test_run_safety import TINY
from roadwork_assets_tests.integration.test_webserver import _free_port


def test_materialize_all_in_roadwork_ui_completes(tmp_path):
    import dagster as dg

    from roadwork_assets.contracts.splits import SPLITS
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import load_bundle
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.run_launcher import PID_TAG
    from roadwork_assets.defs.runner import stages, unmaterialized
    from roadwork_assets_tests.conftest import tiny_resources

    dagster_home, home = tmp_path / "dagster", tmp_path / "home"
    env = ui_driver.ui_env(dagster_home, home)
    env["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    with ui_driver.running_ui(env, port, log=tmp_path / "ui.log") as proc:
        served = ui_driver.materializable_keys(proc, port)
        # the graph `roadwork run` builds: every asset but the optional ones (bundle_int8)
        keys = [[name] for stage in stages(build_definitions(tiny_resources(tmp_path / "x")))
                for name in stage.assets]
        assert all(k in served for k in keys)
        t0 = time.perf_counter()
        backfill = ui_driver.materialize_all(port, keys, TINY)
        status = ui_driver.wait_for_backfill(port, backfill, timeout_s=900)
        elapsed = time.perf_counter() - t0
        assert status == "COMPLETED_SUCCESS", (
            status, (tmp_path / "ui.log").read_text()[-6000:])
    print(f"Materialize all in roadwork ui (tiny config): {elapsed:.1f}s")
    defs = build_definitions(tiny_resources(home))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert unmaterialized(defs, instance) == []
        for name in ("split_manifest", "logits", "multiview_logits"):
            assert instance.get_materialized_partitions(dg.AssetKey(name)) == set(SPLITS)
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert all(PID_TAG in r.tags for r in runs)  # forked, not a fresh interpreter each
    load_bundle(ArtifactRegistry(home).latest_bundle())
