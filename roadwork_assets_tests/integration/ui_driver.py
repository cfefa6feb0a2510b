"""Drive `roadwork ui` as a user's browser does: through the webserver's GraphQL API.

Used by test_ui_backfill and benchmarks/bench_ui_backfill.py: start the UI (webserver
+ daemon, real processes), launch "Materialize all" (the ``launchPartitionBackfill``
mutation the button sends: every asset, all partitions), and poll the backfill's status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from roadwork_assets_tests.integration.test_webserver import BIN, wait_for_asset_nodes

LAUNCH = """mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}"""
STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  ... on PartitionBackfill { status } } }"""
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def post(port: int, query: str, variables: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def ui_env(dagster_home: Path, roadwork_home: Path) -> dict:
    env = dict(os.environ, DAGSTER_HOME=str(dagster_home), ROADWORK_HOME=str(roadwork_home),
               DAGSTER_TELEMETRY_DISABLED="1")
    for var in ("ROADWORK_DATA", "ROADWORK_WEIGHTS", "ROADWORK_MLFLOW_URI"):
        env.pop(var, None)
    return env


@contextmanager
def running_ui(env: dict, port: int, *args: str, log: Path) -> Iterator[subprocess.Popen]:
    """`roadwork ui --port PORT ARGS` until the block ends (then SIGTERM: it stops its
    webserver and daemon), its output in ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "roadwork"), "ui", "--port", str(port), *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def materializable_keys(proc: subprocess.Popen, port: int) -> list[list[str]]:
    nodes = wait_for_asset_nodes(proc, port, "isMaterializable")
    return [n["assetKey"]["path"] for n in nodes if n["isMaterializable"]]


def materialize_all(port: int, keys: list[list[str]], run_config: dict) -> str:
    """The backfill "Materialize all" launches with All partitions; its id."""
    launched = post(port, LAUNCH, {"params": {
        "assetSelection": [{"path": k} for k in keys], "allPartitions": True,
        "runConfigData": run_config, "title": "Materialize all"}})
    result = launched["data"]["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def wait_for_backfill(port: int, backfill_id: str, timeout_s: float) -> str:
    """The backfill's final status (polled every 0.5 s), or the last one at the timeout."""
    deadline, status = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        status = post(port, STATUS, {"id": backfill_id})["data"][
            "partitionBackfillOrError"]["status"]
        if status in DONE:
            return status
        time.sleep(0.5)
    return f"{status} after {timeout_s:.0f}s"
