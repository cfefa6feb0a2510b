"""`roadwork`: the terminal entry point.

  roadwork run                     materialize the whole graph through Dagster
  roadwork predict --bundle DIR IMAGE...   one JSON line per image
  roadwork verify DIR              check a bundle's schema and hashes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from roadwork_assets.contracts.errors import RoadworkError

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def ensure_dagster_home() -> Path:
    """A persistent DAGSTER_HOME, so runs (and the UI) see each other's materializations."""
    from roadwork_assets.defs.resources import default_home

    home = Path(os.environ.get("DAGSTER_HOME") or Path(default_home()) / "dagster_home")
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    home = ensure_dagster_home()
    import dagster as dg

    from roadwork_assets.definitions import defs
    from roadwork_assets.defs.resources import default_home
    from roadwork_assets.defs.runner import materialize_all

    print(f"[roadwork] DAGSTER_HOME={home}  ROADWORK_HOME={default_home()}  "
          f"ROADWORK_DATA={os.environ.get('ROADWORK_DATA') or '(generated default dataset)'}")
    t0 = time.perf_counter()
    run_config = json.loads(args.config_json) if args.config_json else {}
    # Dagster's own event log (every event, and a stack trace for any failure) stays in
    # DAGSTER_HOME for `dagster dev`; the terminal shows the roadwork lines and, for a
    # failed blocking check, one error line (BlockingCheckFailed).
    run_config.setdefault("loggers", {}).setdefault(
        "console", {"config": {"log_level": args.dagster_log_level.upper()}})
    with dg.DagsterInstance.get() as instance:
        materialize_all(defs, instance, run_config=run_config)
    from roadwork_assets.core.artifacts import ArtifactRegistry

    report_path = ArtifactRegistry(Path(default_home())).test_report
    report = json.loads(report_path.read_text())
    fnr = report["fnr"]
    print(f"[roadwork] whole graph materialized in {time.perf_counter() - t0:.0f}s")
    print(f"[roadwork] val_test, as served at 0.5: balanced accuracy "
          f"{report['balanced_accuracy']:.4f}, accuracy {report['accuracy']:.4f}, "
          f"MCC {report['mcc']:.4f}, AUROC {report['auroc']:.4f}, "
          f"FNR {fnr['value']:.4f} ({fnr['errors']}/{fnr['n']}, 95% CI "
          f"[{fnr['ci_low']:.4f}, {fnr['ci_high']:.4f}]), policy FNR "
          f"{report['policy_fnr']['value']:.4f} with {report['policy_defer_rate']:.1%} deferred")
    print(f"[roadwork] the calibrated model alone at 0.5 (no exit policy): balanced accuracy "
          f"{report['model_balanced_accuracy']:.4f}")
    print(f"[roadwork] report: {report_path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from roadwork_assets.core.export.predictor import BundlePredictor

    predictor = BundlePredictor.from_dir(Path(args.bundle), device=args.device)
    for pred in predictor.predict_paths([Path(p) for p in args.images]):
        print(json.dumps(pred.as_dict()), flush=True)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from roadwork_assets.core.export.bundle import load_bundle

    bundle = load_bundle(Path(args.bundle_dir))
    m = bundle.manifest
    print(json.dumps({"ok": True, "bundle_id": m.bundle_id, "policy_kind": m.policy_kind,
                      "files": {r: f.sha256 for r, f in m.files.items()}}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roadwork", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialize the whole asset graph through Dagster")
    r.add_argument("--config-json", help="Dagster run config applied to every stage, e.g. "
                   '\'{"resources": {"trainer": {"config": {"epochs": 5}}}}\'')
    r.add_argument("--dagster-log-level", default="critical",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="Dagster's event log on the terminal (default critical: only the "
                   "roadwork lines; every event is kept in DAGSTER_HOME for `dagster dev`)")
    p = sub.add_parser("predict", help="predict images with a bundle (JSON lines)")
    p.add_argument("--bundle", required=True, help="bundle directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("images", nargs="+")
    v = sub.add_parser("verify", help="verify a bundle's schema and sha256 hashes")
    v.add_argument("bundle_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "predict": cmd_predict, "verify": cmd_verify}[args.command]
    try:
        return handler(args)
    except RoadworkError as exc:
        print(f"roadwork {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
