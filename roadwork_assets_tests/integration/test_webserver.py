"""The Dagster webserver starts over this project and serves its asset graph."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for_asset_nodes(proc: subprocess.Popen, port: int, fields: str,
                         timeout_s: float = 180) -> list[dict]:
    """The webserver's ``assetNodes { assetKey { path } <fields> }`` once it is up and
    its code location has loaded (the location loads after the server answers)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, f"webserver did not come up in {timeout_s:.0f} s"
            time.sleep(1)
    while time.time() < deadline:
        nodes = _graphql(port, f"{{ assetNodes {{ assetKey {{ path }} {fields} }} }}").get(
            "data", {}).get("assetNodes")
        if nodes:
            return nodes
        time.sleep(1)
    raise AssertionError(f"the code location did not load in {timeout_s:.0f} s")


def test_webserver_serves_the_asset_graph(tmp_path):
    port = _free_port()
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), ROADWORK_HOME=str(tmp_path / "home"),
               DAGSTER_TELEMETRY_DISABLED="1")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-m", "roadwork_assets.definitions", "-h", "127.0.0.1",
         "-p", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        data = wait_for_asset_nodes(proc, port, "isPartitioned")
        nodes = {n["assetKey"]["path"][-1]: n["isPartitioned"] for n in data}
        assert nodes["split_manifest"] and nodes["logits"] and nodes["embeddings"]
        assert not nodes["checkpoint"] and not nodes["test_report"]
        assert {"source_images", "thresholds", "gate_params", "conformal_sets", "bundle"} <= set(nodes)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
