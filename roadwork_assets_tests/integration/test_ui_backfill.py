""""Materialize all" in the UI, through the webserver's GraphQL API, to completion.

The UI's "Materialize all" over this graph is an asset backfill across the split
partitions (one run holds one partition; unpartitioned assets run once). This test
starts the real `dagster-webserver` on a temporary DAGSTER_HOME, launches that backfill
with the `launchPartitionBackfill` mutation (every asset, allPartitions), and drives it
with Dagster's own backfill-daemon iteration (``execute_backfill_iteration``, what
`dagster-daemon run` / `dagster dev` call) in a second process, then checks that every
asset was materialized for every split and that the bundle verifies.

Deviations from `dagster dev`, for speed only: the loop iterates every 0.5 s (the
daemon sleeps 30 s between iterations), and runs are launched at once (no run queue)
and execute inside that process (SyncInMemoryRunLauncher) instead of one subprocess
each, which would import torch per run. What is tested — the backfill's run requests, partition mappings, ordering and
completion — is Dagster's own code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from roadwork_assets_tests.integration.test_run_safety import TINY
from roadwork_assets_tests.integration.test_webserver import (
    BIN,
    _free_port,
    wait_for_asset_nodes,
)

DAGSTER_YAML = """telemetry:
  enabled: false
run_coordinator:
  module: dagster._core.run_coordinator
  class: DefaultRunCoordinator
run_launcher:
  module: dagster._core.launcher.sync_in_memory_run_launcher
  class: SyncInMemoryRunLauncher
"""

# Dagster's backfill-daemon iteration, looped until the backfill is done (or 900 s)
DAEMON_LOOP = """
import logging, sys, time
import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget
from dagster._daemon.backfill import execute_backfill_iteration

backfill_id, deadline = sys.argv[1], time.time() + 900
logger = logging.getLogger("backfill_loop")
with dg.DagsterInstance.get() as instance, WorkspaceProcessContext(
        instance, ModuleTarget("roadwork_assets.definitions", None, None, "roadwork_assets")) as ctx:
    while time.time() < deadline:
        for _ in execute_backfill_iteration(ctx, logger):
            pass
        status = instance.get_backfill(backfill_id).status
        if status != BulkActionStatus.REQUESTED:
            break
        time.sleep(0.5)
    print("backfill status:", instance.get_backfill(backfill_id).status.value)
"""

LAUNCH = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""


def _post(port: int, query: str, variables: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_materialize_all_backfill_through_graphql_completes(tmp_path):
    import dagster as dg

    from roadwork_assets.contracts.splits import SPLITS
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import load_bundle
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.runner import stages, unmaterialized
    from roadwork_assets_tests.conftest import tiny_resources

    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    env = dict(os.environ, DAGSTER_HOME=str(dagster_home), ROADWORK_HOME=str(tmp_path / "home"),
               DAGSTER_TELEMETRY_DISABLED="1", OMP_NUM_THREADS="1")
    for var in ("ROADWORK_DATA", "ROADWORK_WEIGHTS", "ROADWORK_MLFLOW_URI"):
        env.pop(var, None)
    port = _free_port()
    web = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "roadwork_assets.definitions", "-h", "127.0.0.1",
         "-p", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        served = _wait_for_asset_keys(web, port)
        # the graph `roadwork run` builds: every asset but the optional ones (bundle_int8)
        keys = [[name] for stage in stages(build_definitions(tiny_resources(tmp_path / "x")))
                for name in stage.assets]
        assert all(k in served for k in keys)
        t0 = time.perf_counter()
        launched = _post(port, LAUNCH, {"params": {
            "assetSelection": [{"path": k} for k in keys], "allPartitions": True,
            "runConfigData": TINY, "title": "Materialize all"}})
        result = launched["data"]["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        loop = subprocess.run([sys.executable, "-c", DAEMON_LOOP, result["backfillId"]],
                              env=env, capture_output=True, text=True, timeout=1000, check=False)
        elapsed = time.perf_counter() - t0
        assert "backfill status: COMPLETED_SUCCESS" in loop.stdout, (
            loop.stdout[-2000:] + loop.stderr[-4000:])
        status = _post(port, "query($id: String!) { partitionBackfillOrError(backfillId: $id) "
                       "{ ... on PartitionBackfill { status } } }",
                       {"id": result["backfillId"]})["data"]["partitionBackfillOrError"]
        assert status["status"] == "COMPLETED_SUCCESS"
    finally:
        web.terminate()
        try:
            web.wait(timeout=30)
        except subprocess.TimeoutExpired:
            web.kill()
    print(f"UI backfill of the whole graph (tiny config): {elapsed:.1f}s")
    defs = build_definitions(tiny_resources(tmp_path / "home"))
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert unmaterialized(defs, instance) == []
        for name in ("split_manifest", "embeddings", "logits", "multiview_logits"):
            assert instance.get_materialized_partitions(dg.AssetKey(name)) == set(SPLITS)
        runs = instance.get_runs()
        assert runs and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    load_bundle(ArtifactRegistry(tmp_path / "home").latest_bundle())


def _wait_for_asset_keys(proc: subprocess.Popen, port: int) -> list[list[str]]:
    nodes = wait_for_asset_nodes(proc, port, "isMaterializable")
    return [n["assetKey"]["path"] for n in nodes if n["isMaterializable"]]
