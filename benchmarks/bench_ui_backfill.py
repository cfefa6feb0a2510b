"""The whole graph from the UI ("Materialize all") against `roadwork run`, in one run.

    .venv/bin/python benchmarks/bench_ui_backfill.py [--config tiny|default]
        [--dagster-defaults] [--work /tmp/bench_ui] [--out result.json]

For each path, on fresh DAGSTER_HOME / ROADWORK_HOME folders and the same run config:

- ``roadwork ui``: `roadwork ui` started for real (webserver + daemon with its 1 s
  backfill loop, the project's dagster.yaml: 1 s run queue, ForkserverRunLauncher), then
  the backfill the *Materialize all* button launches (GraphQL ``launchPartitionBackfill``,
  every asset `roadwork run` builds, all partitions), timed from launch to
  COMPLETED_SUCCESS;
- ``dagster defaults`` (``--dagster-defaults``): the same, with what plain ``dagster
  dev`` does: backfill loop every 30 s, the run queue every 5 s, DefaultRunLauncher (a
  fresh interpreter per run);
- ``roadwork run --force``: the CLI path (every stage in one process).

Prints seconds per path and the ratios to `roadwork run`, plus the runs' start latency
(queued -> started, median and max) for the UI paths. ``--config tiny`` is the test
suite's 160-image 32 px config; ``default`` is the embedded default dataset.

Measured 2026-11-26 on 2 CPU cores shared with two other engineers' tests (load average
5-6, so absolute seconds are inflated; the ratios are from one run): see the closing
note of issue 13 and the README ("The UI").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from roadwork_assets_tests.integration import ui_driver  # noqa: E402
from roadwork_assets_tests.integration.test_run_safety import TINY  # noqa: E402
from roadwork_assets_tests.integration.test_webserver import BIN, _free_port  # noqa: E402

DAGSTER_DEFAULTS_YAML = """telemetry:
  enabled: false
run_launcher:
  module: dagster._core.launcher
  class: DefaultRunLauncher
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
"""


def _run_latencies(dagster_home: Path) -> list[float]:
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        out = []
        for run in instance.get_runs():
            record = instance.get_run_record_by_id(run.run_id)
            if record.start_time:
                out.append(record.start_time - record.create_timestamp.timestamp())
        return out


def ui_path(work: Path, run_config: dict, dagster_defaults: bool) -> dict:
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.runner import stages

    dagster_home, home = work / "dagster", work / "home"
    dagster_home.mkdir(parents=True)
    if dagster_defaults:
        (dagster_home / "dagster.yaml").write_text(DAGSTER_DEFAULTS_YAML)
    env = ui_driver.ui_env(dagster_home, home)
    port = _free_port()
    interval = ["--backfill-interval", "30"] if dagster_defaults else []
    with ui_driver.running_ui(env, port, *interval, log=work / "ui.log") as proc:
        ui_driver.materializable_keys(proc, port)
        keys = [[name] for stage in stages(build_definitions()) for name in stage.assets]
        t0 = time.perf_counter()
        backfill = ui_driver.materialize_all(port, keys, run_config)
        status = ui_driver.wait_for_backfill(port, backfill, timeout_s=3600)
        seconds = time.perf_counter() - t0
    latencies = _run_latencies(dagster_home)
    return {"seconds": seconds, "status": status, "runs": len(latencies),
            "start_latency_median_s": statistics.median(latencies),
            "start_latency_max_s": max(latencies)}


def cli_path(work: Path, run_config: dict) -> dict:
    env = ui_driver.ui_env(work / "dagster", work / "home")
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "roadwork"), "run", "--force", "--config-json",
                           json.dumps(run_config)], env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"roadwork run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return {"seconds": seconds, "status": "rc 0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--dagster-defaults", action="store_true",
                        help="also time plain dagster dev's settings (30 s loop, ~5 min)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_ui"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    run_config = TINY if args.config == "tiny" else {}
    shutil.rmtree(args.work, ignore_errors=True)
    results = {"roadwork ui": ui_path(args.work / "ui", run_config, False)}
    if args.dagster_defaults:
        results["dagster defaults"] = ui_path(args.work / "defaults", run_config, True)
    results["roadwork run --force"] = cli_path(args.work / "cli", run_config)
    cli = results["roadwork run --force"]["seconds"]
    print(f"whole graph, config {args.config}:")
    for name, r in results.items():
        extra = (f"  {r['runs']} runs, start latency median {r['start_latency_median_s']:.1f}s"
                 f" max {r['start_latency_max_s']:.1f}s") if "runs" in r else ""
        print(f"  {name:22s} {r['seconds']:7.1f}s  x{r['seconds'] / cli:4.2f} of roadwork run"
              f"  ({r['status']}){extra}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
