"""`roadwork`: the terminal entry point.

  roadwork run [--force] [--verbose]   materialize the whole graph through Dagster,
                                   skipping what is up to date (--force: everything);
                                   prints progress, then the bundle it made
  roadwork predict [--bundle DIR] IMAGE...   one JSON line per image: path, probability,
                                   decision, stage (JPEG, PNG, WebP; any size); default
                                   bundle: the latest under ROADWORK_HOME; an unreadable
                                   image gets {"path", "error"} and exit code 1
  roadwork ui [--port 3000]        Dagster's webserver + daemon (as `dagster dev`), with
                                   backfills ("Materialize all") advancing every second
                                   instead of every 30 s
  roadwork dagster-commands        the `dagster asset materialize` commands (one per stage,
                                   split and embedding shard) that materialize the graph
  roadwork verify DIR              check a bundle: closed, hashes, lineage, ONNX probe
                                   (a cascade's stage 2 too)
  roadwork serve --bundle DIR      HTTP endpoint: POST /predict {"image": base64} ->
                                   {"prediction": float}; /healthz, /metrics
  roadwork import-labels EXPORT --out NEW.csv   Label Studio's JSON export (of
                                   label_queue's tasks) -> a labelled manifest to add to
                                   ROADWORK_DATA; images already in a split are refused,
                                   annotator conflicts listed (NEW.refused.csv, ...)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path

from roadwork_assets.contracts.errors import RoadworkError

# `roadwork predict`: some images could not be read (each has an error line); the others
# were predicted. A bad bundle or setting is 2, an environment problem (disk) 3.
EXIT_SOME_IMAGES_FAILED = 1
REPO_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def _writable_dir(path: Path, what: str) -> Path:
    """``path`` as a usable directory (created if missing), or one line saying why not."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise RoadworkError(f"{what}={path} is a file, not a folder: point {what} at a "
                            "folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RoadworkError(f"{what}={path} cannot be created ({exc.strerror}): point {what} "
                            "at a folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RoadworkError(f"{what}={path} is not writable: fix its permissions or point "
                            f"{what} at a folder you can write")
    return path


def dagster_home_path() -> Path:
    from roadwork_assets.defs.resources import default_home

    return Path(os.environ.get("DAGSTER_HOME") or Path(default_home()) / "dagster_home")


def ensure_dagster_home() -> Path:
    """A persistent DAGSTER_HOME, so runs (and the UI) see each other's materializations."""
    home = _writable_dir(dagster_home_path(), "DAGSTER_HOME")
    target = home / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _parse_config_json(text: str | None) -> dict:
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoadworkError(f"--config-json is not valid JSON ({exc.msg} at line {exc.lineno} "
                            f"column {exc.colno}): quote keys and strings with double quotes, "
                            "e.g. '{\"resources\": {\"trainer\": {\"config\": {\"epochs\": 5}}}}'"
                            ) from None


def cmd_run(args: argparse.Namespace) -> int:
    from roadwork_assets.defs.console import quiet_terminal

    with quiet_terminal(args.verbose):  # before any import of dagster_mlflow
        return _cmd_run(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from roadwork_assets.core.runlock import hold_lock
    from roadwork_assets.defs.resources import default_home
    from roadwork_assets.defs.settings import resolve_settings

    # everything that can be refused is refused here, before any artifact is touched
    settings = resolve_settings(_parse_config_json(args.config_json))
    root = _writable_dir(Path(default_home()), "ROADWORK_HOME")
    _writable_dir(dagster_home_path(), "DAGSTER_HOME")
    with hold_lock(root, wait=args.wait, what="ROADWORK_HOME"):
        return _run_locked(args, root, settings)


def _run_locked(args: argparse.Namespace, root: Path, settings) -> int:
    import dagster as dg

    from roadwork_assets import definitions
    from roadwork_assets.core.artifacts import ArtifactRegistry, collect_dead_leftovers
    from roadwork_assets.core.runlock import hold_lock
    from roadwork_assets.defs.console import console_logger_config, with_console
    from roadwork_assets.defs.freshness import Expected, FreshnessJudge
    from roadwork_assets.defs.runner import fail_abandoned_runs, materialize_all

    home = ensure_dagster_home()
    print(f"[roadwork] DAGSTER_HOME={home}  ROADWORK_HOME={root}  "
          f"ROADWORK_DATA={os.environ.get('ROADWORK_DATA') or '(unset)'}")
    for line in settings.header_lines():
        print(line)
    for path in collect_dead_leftovers(root):
        print(f"[roadwork] removed {path.relative_to(root)}: left by a run that is gone")
    t0 = time.perf_counter()
    # `definitions.defs` took ROADWORK_HOME when the module was first imported, which in a
    # long-lived process (a notebook, the test suite) may be another home
    defs = with_console(definitions.current_definitions())
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = settings.run_config(set(job.resource_defs))
    # Dagster's own event log (every event, and a stack trace for any failure) stays in
    # DAGSTER_HOME for `dagster dev`; the terminal shows the roadwork lines, the assets'
    # own log lines (progress, warnings) and, for a failed blocking check, one error line
    # (BlockingCheckFailed); --verbose adds the event stream.
    run_config.setdefault("loggers", {}).setdefault(
        "console", console_logger_config(args.verbose, args.dagster_log_level))
    # creating (and migrating) a fresh instance is serialised even when several
    # ROADWORK_HOMEs share one DAGSTER_HOME
    with hold_lock(home, wait=True, what="DAGSTER_HOME", say=lambda _m: None):
        instance = dg.DagsterInstance.get()
    with instance:
        for run_id in fail_abandoned_runs(instance):
            print(f"[roadwork] marked run {run_id} failed: the roadwork run that started it "
                  "is gone")
        judge = None if args.force else FreshnessJudge(
            defs, instance, Expected.of(settings.values, ArtifactRegistry(root)))
        runs = materialize_all(defs, instance, run_config=run_config, judge=judge)
    report_path = ArtifactRegistry(root).test_report
    report = json.loads(report_path.read_text())
    print(f"[roadwork] whole graph materialized in {time.perf_counter() - t0:.0f}s"
          + ("" if args.force else f" ({len(runs)} stage runs; up-to-date assets skipped, "
             "--force rebuilds everything)"))
    from roadwork_assets.core.evaluation.validator_rows import closing_lines

    for line in closing_lines(report):
        print(f"[roadwork] {line}")
    bundle_dir = ArtifactRegistry(root).bundle_dir(report["bundle_id"])
    print(f"[roadwork] bundle: {report['bundle_id']}")
    print(f"[roadwork]   in {bundle_dir}")
    print(f"[roadwork]   try it: roadwork predict --bundle {bundle_dir} IMAGE...")
    print(f"[roadwork] report: {report_path}")
    return 0


def cmd_dagster_commands(args: argparse.Namespace) -> int:
    import shlex

    from roadwork_assets.defs.settings import resolve_settings

    resolve_settings(_parse_config_json(args.config_json))  # refuse bad settings here
    from roadwork_assets import definitions
    from roadwork_assets.defs.runner import dagster_commands

    extra = ["--config-json", args.config_json] if args.config_json else []
    for cmd in dagster_commands(definitions.defs, extra=extra):
        print(shlex.join(cmd))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from roadwork_assets.defs.ui import UiConfig, serve_ui

    try:
        config = UiConfig(host=args.host, port=args.port,
                          backfill_interval_s=args.backfill_interval,
                          log_level="info" if args.verbose else "warning")
    except ValidationError as exc:
        flags = {"port": "--port", "backfill_interval_s": "--backfill-interval"}
        raise RoadworkError("; ".join(
            f"{flags.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors())
        ) from None
    home = ensure_dagster_home()
    instance_yaml = home / "dagster.yaml"
    if "ForkserverRunLauncher" not in (
            instance_yaml.read_text() if instance_yaml.exists() else ""):
        print(f"[roadwork] note: {home / 'dagster.yaml'} is not the project's (older, or "
              "edited): each run from the UI starts a fresh interpreter (~5 s of imports); "
              f"copy {REPO_DAGSTER_YAML} over it for runs forked from one import")
    return serve_ui(config)


def cmd_predict(args: argparse.Namespace) -> int:
    from roadwork_assets.core.export.predictor import BundlePredictor, FailedImage

    predictor = BundlePredictor.from_dir(resolve_bundle_dir(args.bundle), device=args.device,
                                         check_onnx=not args.skip_onnx_check,
                                         engine=args.engine)
    manifest = predictor.bundle.manifest
    if manifest.precision != "fp32":  # say it: scores differ from the fp32 bundle's
        print(f"roadwork predict: bundle {manifest.bundle_id} is {manifest.precision} "
              f"(from fp32 bundle {manifest.source_bundle_id}); engine: "
              f"{predictor.engine_reason}", file=sys.stderr)
    failed = 0
    for result in predictor.predict_each([Path(p) for p in args.images]):
        print(json.dumps(result.as_dict()), flush=True)
        if isinstance(result, FailedImage):
            failed += 1
            print(f"roadwork predict: {result.path}: {result.error}", file=sys.stderr)
    if failed:
        print(f"roadwork predict: {failed} of {len(args.images)} images failed", file=sys.stderr)
    return EXIT_SOME_IMAGES_FAILED if failed else 0


def resolve_bundle_dir(given: str | None) -> Path:
    """The bundle to serve: ``given`` if it is a bundle; the one LATEST names when it is
    a bundles folder or a ROADWORK_HOME; with nothing given, the latest bundle under
    ROADWORK_HOME."""
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.defs.resources import default_home

    if given is None:
        home = Path(default_home())
        if not ArtifactRegistry(home).latest_bundle_pointer.exists():
            raise RoadworkError(f"no bundle under ROADWORK_HOME={home}: run `roadwork run` "
                                "first, or pass --bundle DIR")
        return ArtifactRegistry(home).latest_bundle()
    path = Path(given).expanduser()
    if (path / "LATEST").is_file() and not (path / "manifest.json").exists():
        bundle_id = (path / "LATEST").read_text().strip()
        if not bundle_id or Path(bundle_id).name != bundle_id:
            raise RoadworkError(f"{path / 'LATEST'} does not name a bundle inside {path}")
        return path / bundle_id
    if (path / "bundles" / "LATEST").is_file():
        return ArtifactRegistry(path).latest_bundle()
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    from roadwork_assets.core.export.server import ServeSettings, run_server

    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_request_bytes=int(args.max_request_mb * 1024**2))
    return run_server(resolve_bundle_dir(args.bundle), host=args.host, port=args.port, engine=args.engine,
                      settings=settings)


def cmd_verify(args: argparse.Namespace) -> int:
    from roadwork_assets.core.export.bundle import load_bundle

    bundle = load_bundle(Path(args.bundle_dir))
    m = bundle.manifest
    print(json.dumps({"ok": True, "bundle_id": m.bundle_id, "policy_kind": m.policy_kind,
                      "stages": m.stages,
                      "checkpoint_sha256": m.provenance.checkpoint_sha256,
                      "onnx_checked": bundle.onnx_checked,
                      "files": {r: f.sha256 for r, f in m.files.items()}}))
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    import pandas as pd

    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.data.labelstudio import import_export, write_import
    from roadwork_assets.defs.resources import default_home

    assignment_path = ArtifactRegistry(Path(default_home())).split_assignment
    if not assignment_path.exists():
        raise RoadworkError(f"no split assignment at {assignment_path}: without it no image "
                            "can be checked against the splits; run `roadwork run` (or set "
                            "ROADWORK_HOME to the home that has one) first")
    result = import_export(args.export, pd.read_parquet(assignment_path), url_root=args.url_root)
    paths = write_import(result, args.out)
    print(f"[roadwork] {len(result.manifest)} labelled images -> {paths['manifest']} "
          "(add it to ROADWORK_DATA)")
    for name, frame in (("refused", result.refused), ("conflicts", result.conflicts),
                        ("unlabelled", result.unlabelled)):
        print(f"[roadwork] {len(frame)} {name} -> {paths[name]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roadwork", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="materialize the whole asset graph through Dagster")
    r.add_argument("--config-json", help="Dagster run config applied to every stage, e.g. "
                   '\'{"resources": {"trainer": {"config": {"epochs": 5}}}}\'')
    r.add_argument("--force", action="store_true",
                   help="rebuild every asset; without it, assets whose code, settings, inputs "
                   "and artifact on disk are unchanged since their last materialization are "
                   "skipped (each skip and each rebuild reason is printed)")
    r.add_argument("--wait", action="store_true",
                   help="if another run holds ROADWORK_HOME, wait for it instead of refusing")
    r.add_argument("--verbose", action="store_true",
                   help="also print Dagster's full event stream (DEBUG), the MLflow "
                   "BetaWarnings and MLflow/alembic database lines; without it the terminal "
                   "shows roadwork's lines, progress and warnings (every event is kept in "
                   "DAGSTER_HOME for `dagster dev` either way)")
    r.add_argument("--dagster-log-level", default=None,
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="threshold of the asset log lines on the terminal (default info; "
                   "debug with --verbose); critical shows only the [roadwork] lines")
    d = sub.add_parser("dagster-commands", help="print the `dagster asset materialize` "
                       "commands that materialize the whole graph (one per stage; per split, or "
                       "per 'shard|split' for embeddings, for partitioned stages), one shell "
                       "line each, in order")
    d.add_argument("--config-json", help="Dagster run config added to every command (checked "
                   "first, as for run)")
    u = sub.add_parser("ui", help="start Dagster's webserver and daemon (as `dagster dev` "
                       "does) on the instance `roadwork run` uses, with backfills that "
                       "advance every second")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                   "127.0.0.1)")
    u.add_argument("--port", type=int, default=3000, help="TCP port (default 3000)")
    u.add_argument("--backfill-interval", type=float, default=1.0,
                   help="seconds the backfill daemon sleeps between loops, 0.2-60 "
                   "(default 1; plain `dagster dev`: 30)")
    u.add_argument("--verbose", action="store_true",
                   help="show the webserver's and daemon's INFO lines (default: warnings)")
    p = sub.add_parser("predict", help="predict images with a bundle (JSON lines)")
    p.add_argument("--bundle", help="a bundle folder, or a bundles folder / ROADWORK_HOME "
                   "(the bundle its LATEST names); default: the latest bundle under "
                   "ROADWORK_HOME")
    p.add_argument("--device", default="cpu",
                   help="torch device for the torch engine, e.g. cpu, cuda (default cpu)")
    p.add_argument("--skip-onnx-check", action="store_true",
                   help="skip comparing model.onnx with torch on the bundle's probe batch "
                   "(the ONNX engine then never serves; every other load-time check still runs)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="what computes the logits: auto (default) = ONNX Runtime where the "
                   "bundle has checked ONNX files and a one-time timing says it is faster")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (JPEG, PNG, WebP; any size). An unreadable one gets "
                   "an {\"path\", \"error\"} line and exit code 1; the others are predicted")
    s = sub.add_parser("serve", help="serve a bundle over HTTP (StreetVision-style "
                       "{\"image\": base64} -> {\"prediction\": float}, micro-batched)")
    s.add_argument("--bundle", help="as for predict: a bundle folder, a bundles folder or "
                   "ROADWORK_HOME; default: the latest bundle under ROADWORK_HOME")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--engine", default="auto", choices=["auto", "torch", "onnx"],
                   help="what computes the logits (as for predict)")
    s.add_argument("--max-batch", type=int, default=16,
                   help="most requests answered by one model call (default 16)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    s.add_argument("--max-request-mb", type=float, default=16.0,
                   help="larger request bodies are refused with 413 (default 16 MiB)")
    v = sub.add_parser("verify", help="verify a bundle: closed folder, sha256 hashes, "
                       "lineage, bounds, torch and ONNX on the stored probe batch")
    v.add_argument("bundle_dir", help="the bundle folder to check (bundles/<id>)")
    i = sub.add_parser("import-labels", help="Label Studio JSON export -> labelled manifest "
                       "(never relabels an image already in a split)")
    i.add_argument("export", help="the project's export in Label Studio's 'JSON' format")
    i.add_argument("--out", required=True, help="the manifest to write (*.csv); refused, "
                   "conflicting and unlabelled tasks go to <stem>.refused.csv etc. beside it")
    i.add_argument("--url-root", default="/", help="Label Studio's "
                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, for tasks that carry only a "
                   "local-files image URL (default /)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "predict": cmd_predict, "verify": cmd_verify,
               "serve": cmd_serve, "dagster-commands": cmd_dagster_commands, "ui": cmd_ui,
               "import-labels": cmd_import_labels}[args.command]
    try:
        return handler(args)
    except RoadworkError as exc:
        print(f"roadwork {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an environment problem (disk, permissions) is one line too
        line = environment_problem(exc)
        if line is None:
            raise
        print(f"roadwork {args.command}: error: {line}", file=sys.stderr)
        return 3


def environment_problem(exc: BaseException) -> str | None:
    """One line for a full disk, a read-only or vanished folder anywhere in the cause
    chain (Dagster may wrap it), else None: a bug keeps its traceback."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno in _ERRNO_FIX:
            where = f" ({exc.filename})" if exc.filename else ""
            return (f"{exc.strerror or errno.errorcode[exc.errno]}{where}: "
                    f"{_ERRNO_FIX[exc.errno]}; artifacts already in place were not replaced")
        if "database or disk is full" in text or "readonly database" in text:
            return (f"{text.splitlines()[0][:200]}: free disk space or make DAGSTER_HOME "
                    "writable; artifacts already in place were not replaced")
        exc = exc.__cause__ or exc.__context__
    return None


_ERRNO_FIX = {
    errno.ENOSPC: "free disk space under ROADWORK_HOME / DAGSTER_HOME and run again",
    errno.EDQUOT: "free space within your disk quota and run again",
    errno.EACCES: "make ROADWORK_HOME / DAGSTER_HOME writable, or point them elsewhere",
    errno.EPERM: "make ROADWORK_HOME / DAGSTER_HOME writable, or point them elsewhere",
    errno.EROFS: "the file system is read-only: point ROADWORK_HOME / DAGSTER_HOME elsewhere",
    errno.ENOTDIR: "a path under ROADWORK_HOME is a file where a folder belongs: remove it",
}


if __name__ == "__main__":
    sys.exit(main())
