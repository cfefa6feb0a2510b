"""MLflow tracking for the assets: one MLflow run per materialization, named after it.

dagster-mlflow's resource opens one MLflow run per Dagster run and names it after the
job (``__ASSET_JOB`` for every asset materialization), and MLflow's fluent API keeps
the active run in process-global state. This resource uses ``MlflowClient`` with
explicit run ids instead, so each asset gets its own run:

- run names: ``checkpoint``, ``logits[val_calib]`` (asset[partition]),
  ``bundle:<bundle_id>``, ``test_report:<bundle_id>``;
- tags: ``dagster_run_id``, ``dagster.asset``, ``dagster.partition``;
- artifacts: the experiment is created with ``artifact_location`` under
  ``ROADWORK_HOME/mlflow/artifacts`` (a file URI), never ``./mlruns`` of the cwd.
  A server tracking URI (http/https/databricks) keeps the server's artifact store;
- the model registry: ``register_bundle`` versions each bundle once (keyed by its
  bundle id), with the policy, its guarantee and metrics as tags.

MLflow stays here, in defs: core never imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

SERVER_SCHEMES = ("http://", "https://", "databricks")
# MLflow's log_batch limits (per request)
_MAX_METRICS, _MAX_PARAMS = 1000, 100
_MAX_PARAM_CHARS = 6000


def run_name(context: dg.AssetExecutionContext, suffix: str | None = None) -> str:
    """``asset`` or ``asset[partition]``, then ``:suffix`` (a bundle id) when given."""
    name = context.asset_key.to_user_string()
    if context.has_partition_key:
        name += f"[{context.partition_key}]"
    return f"{name}:{suffix}" if suffix else name


def flatten_numbers(record: Mapping[str, Any], prefix: str = "",
                    skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Finite numbers of a nested JSON record as ``prefix.a.b`` -> float (bools as 0/1).

    A ``value`` key names its parent (``fnr: {value, ci_high}`` -> ``fnr``,
    ``fnr.ci_high``); lists of dicts with a ``name`` (comparison rows) are keyed by it;
    other lists are skipped (curves and score lists are artifacts, not metrics)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in skip:
            continue
        path = prefix if key == "value" else (f"{prefix}.{key}" if prefix else str(key))
        if isinstance(value, Mapping):
            out |= flatten_numbers(value, path, skip)
        elif isinstance(value, list):
            for row in value:
                if isinstance(row, Mapping) and isinstance(row.get("name"), str):
                    out |= flatten_numbers({k: v for k, v in row.items() if k != "name"},
                                           f"{path}.{row['name']}", skip)
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[path] = float(value)
    return out


# the policy's settings and guarantee (params); every other number of a policy record
# is an estimate on val_calib (metrics, named val_calib.<key>)
POLICY_PARAM_KEYS = ("kind", "alpha", "delta", "guarantee", "guarantee_statement", "mode",
                     "conformal_method", "composition", "calibration_unit", "fit_fraction",
                     "positive_fdr_target", "positive_prior", "latency_budget_s",
                     "latency_source")
_POLICY_SKIP = ("provenance", "schema_version", "main_view", "score_reference",
                "calibrator", "calibrator_stage1", "calibrator_stage2", "split_rule")


def policy_record(policy: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(params, metrics) of a policy JSON record (fitted or not)."""
    params = {k: policy[k] for k in POLICY_PARAM_KEYS if policy.get(k) is not None}
    params["fitted"] = policy.get("fitted", True)
    for key in ("calibrator", "calibrator_stage1", "calibrator_stage2"):
        if isinstance(policy.get(key), Mapping):
            params[key] = policy[key].get("method")
    if not params["fitted"]:
        params["unfitted_reason"] = policy.get("reason", "")
    numbers = {k: v for k, v in policy.items() if k not in POLICY_PARAM_KEYS}
    return params, flatten_numbers(numbers, "val_calib", skip=_POLICY_SKIP)


@dataclass(frozen=True)
class TrackedRun:
    """One open MLflow run; every call names its run id (no global active run)."""

    client: Any  # mlflow.MlflowClient
    run_id: str

    def log(self, *, params: Mapping[str, Any] | None = None,
            metrics: Mapping[str, float] | None = None, step: int = 0,
            tags: Mapping[str, Any] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in _keyed(metrics).items()
              if v is not None and math.isfinite(float(v))]
        ps = [Param(k, _param_text(v)) for k, v in _keyed(params).items() if v is not None]
        ts = [RunTag(k, str(v)) for k, v in _keyed(tags).items() if v is not None]
        for i in range(0, max(len(ms), len(ps), len(ts)), _MAX_PARAMS):
            self.client.log_batch(self.run_id, metrics=ms[i:i + _MAX_PARAMS],
                                  params=ps[i:i + _MAX_PARAMS], tags=ts[i:i + _MAX_PARAMS])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents under ``artifact_path``."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def rename(self, name: str) -> None:
        self.client.update_run(self.run_id, name=name)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


def _keyed(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keys MLflow accepts (``[\\w.\\- ]``, no leading dot, <= 250 chars): a source or row
    name from the data (``camera:3/a``) must not fail the asset that logs it."""
    out = {}
    for key, value in (values or {}).items():
        clean = re.sub(r"[^\w.\- ]", "_", str(key)).lstrip(".")[:250] or "_"
        out[clean] = value
    return out


def _is_cwd_default(location: str) -> bool:
    """MLflow's default artifact location for a SQL store: ``<cwd>/mlruns/<experiment>``."""
    return "mlruns" in Path(location.removeprefix("file://")).parts


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."


class MlflowTracking(dg.ConfigurableResource):
    """Where MLflow runs, artifacts and registered bundles go (``ROADWORK_MLFLOW_URI``,
    else ``ROADWORK_HOME/mlflow``)."""

    tracking_uri: str
    experiment_name: str = "roadwork_assets"
    artifact_root: str | None = None  # a folder; None: the tracking server's artifact store
    registered_model: str = "roadwork_bundle"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def artifact_location(self) -> str | None:
        if self.artifact_root is None or self.tracking_uri.startswith(SERVER_SCHEMES):
            return None
        return Path(self.artifact_root).expanduser().resolve().as_uri()

    def experiment_id(self, client) -> str:
        """The experiment, created with the artifact location on first use. One made
        before artifacts lived under ROADWORK_HOME (MLflow's default ``<cwd>/mlruns``) is
        renamed aside — MLflow cannot move an experiment's artifact location — and its
        runs kept. Any other location (a tracking URI shared by several homes: the home
        that created the experiment) is kept, so homes never rename each other's."""
        from mlflow.exceptions import MlflowException

        wanted = self.artifact_location()
        exp = client.get_experiment_by_name(self.experiment_name)
        if exp is not None and wanted and _is_cwd_default(exp.artifact_location):
            client.rename_experiment(
                exp.experiment_id, f"{self.experiment_name} (before {exp.experiment_id}: "
                f"artifacts at {exp.artifact_location})"[:250])
            exp = None
        if exp is None:
            try:
                return client.create_experiment(self.experiment_name, artifact_location=wanted)
            except MlflowException:  # another process created it meanwhile
                exp = client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":  # deleted in the UI: bring it back
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    @contextlib.contextmanager
    def run(self, context: dg.AssetExecutionContext, name: str | None = None,
            tags: Mapping[str, Any] | None = None) -> Iterator[TrackedRun]:
        """An MLflow run for this materialization: FINISHED on return, FAILED when the
        asset body raises (and the error goes on)."""
        client = self.client()
        run_tags = {"dagster_run_id": context.run_id,
                    "dagster.asset": context.asset_key.to_user_string(),
                    **({"dagster.partition": context.partition_key}
                       if context.has_partition_key else {}),
                    **{k: str(v) for k, v in (tags or {}).items()}}
        created = client.create_run(self.experiment_id(client),
                                    run_name=name or run_name(context), tags=run_tags)
        tracked = TrackedRun(client, created.info.run_id)
        try:
            yield tracked
        except BaseException:
            client.set_terminated(tracked.run_id, "FAILED")
            raise
        client.set_terminated(tracked.run_id, "FINISHED")

    def register_bundle(self, run: TrackedRun, directory: Path, bundle_id: str,
                        tags: Mapping[str, Any], description: str) -> str:
        """The bundle folder as the run's ``bundle`` artifact and one model version per
        bundle id (an existing version of this bundle is returned, not duplicated)."""
        from mlflow.exceptions import MlflowException

        client = run.client
        found = client.search_model_versions(
            f"name = '{self.registered_model}' and tags.bundle_id = '{bundle_id}'")
        if found:
            return str(found[0].version)
        run.log_artifact(directory, "bundle")
        with contextlib.suppress(MlflowException):  # it exists already
            client.create_registered_model(
                self.registered_model, description="roadwork bundles: checkpoint + one "
                "exit policy + ONNX (see the bundle_id / manifest_sha256 tags)")
        version = client.create_model_version(
            self.registered_model, source=f"{run.artifact_uri}/bundle", run_id=run.run_id,
            tags={"bundle_id": bundle_id,
                  **{k: _param_text(v) for k, v in _keyed(tags).items() if v is not None}},
            description=description)
        return str(version.version)

    def tag_bundle_version(self, bundle_id: str, tags: Mapping[str, Any]) -> str | None:
        """Add tags (test_report's val_test metrics) to the version of ``bundle_id``;
        None when that bundle was never registered (built before registration existed)."""
        client = self.client()
        found = client.search_model_versions(
            f"name = '{self.registered_model}' and tags.bundle_id = '{bundle_id}'")
        if not found:
            return None
        version = str(found[0].version)
        for key, value in _keyed(tags).items():
            client.set_model_version_tag(self.registered_model, version, key, _param_text(value))
        return version


def provenance_tags(record: Mapping[str, Any]) -> dict[str, str]:
    prov = record.get("provenance") or {}
    return {f"roadwork.{k}": prov[k] for k in ("data_version", "code_version",
                                               "checkpoint_sha256") if prov.get(k)}


def log_policy(tracking: MlflowTracking, context: dg.AssetExecutionContext, written: Path,
               name: str, plots: tuple[Path, ...] = ()) -> str:
    """One run for a policy asset: its settings and guarantee (params), its val_calib
    estimates (metrics ``val_calib.*``), the policy JSON as ``policy/<name>`` and plots.
    ``written`` is the staged file; ``name`` the artifact's published name. Returns the
    run id (for the asset's metadata)."""
    text = Path(written).read_text()
    record = json.loads(text)
    params, metrics = policy_record(record)
    with tracking.run(context) as run:
        run.log(params=params, metrics=metrics, tags=provenance_tags(record))
        run.client.log_text(run.run_id, text, f"policy/{name}")
        for plot in plots:
            run.log_artifact(plot, "plots")
    return run.run_id


# report sections that are not metrics of the served policy on val_test
_REPORT_SKIP = ("provenance", "schema_version", "confusion_matrix", "score_shift",
                "ece_bins", "confidence")


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """val_test.* metrics of a test_report record (``val_test.mcc``, ``val_test.fnr``,
    ``val_test.fnr.ci_high``, ``val_test.comparison.<row>.mcc``, ...)."""
    split = report.get("split", "val_test")
    return flatten_numbers(report, split, skip=_REPORT_SKIP)


def log_bundle(tracking: MlflowTracking, context: dg.AssetExecutionContext, directory: Path,
               register: bool, metrics: Mapping[str, float]) -> tuple[str, str | None]:
    """One run ``bundle:<bundle_id>``: the served policy's params and val_calib metrics,
    the model's, ``metrics`` (ONNX parity), the bundle id and manifest sha256 as tags;
    with ``register`` (its checks passed) the folder is logged and registered.
    Returns (run id, model version or None)."""
    from roadwork_assets.core.artifacts import file_sha256
    from roadwork_assets.core.export.bundle_checks import MANIFEST, POLICY_FILE

    manifest = json.loads((directory / MANIFEST).read_text())
    params, policy_metrics = policy_record(json.loads((directory / POLICY_FILE).read_text()))
    bundle_id = manifest["bundle_id"]
    ids = {"bundle_id": bundle_id, "manifest_sha256": file_sha256(directory / MANIFEST)}
    model = {f"model.{k}": manifest.get(k) for k in ("backbone_name", "mode", "img_size",
                                                      "n_views", "stages")}
    with tracking.run(context, name=run_name(context, bundle_id),
                      tags={f"roadwork.{k}": v for k, v in ids.items()}) as run:
        run.log(params={**params, **model}, metrics={**policy_metrics, **metrics},
                tags=provenance_tags(manifest))
        version = None
        if register:
            top = {k: v for k, v in policy_metrics.items() if k.count(".") == 1}
            version = tracking.register_bundle(
                run, directory, bundle_id, tags={**ids, "policy_kind": manifest["policy_kind"],
                                                 **params, **model, **top},
                description=f"bundle {bundle_id}: policy {manifest['policy_kind']}, alpha "
                f"{params.get('alpha')}. {params.get('guarantee_statement', '')}")
    return run.run_id, version


# the val_test numbers a registered bundle version carries as tags
VERSION_REPORT_KEYS = ("mcc", "fnr", "fnr.ci_high", "fpr", "balanced_accuracy", "accuracy",
                       "auroc", "ece", "policy_defer_rate", "n_images")


def log_report(tracking: MlflowTracking, context: dg.AssetExecutionContext, written: Path,
               name: str, params: Mapping[str, Any], plots: tuple[Path, ...] = ()) -> str:
    """One run ``test_report:<bundle_id>``: every number of the report as a
    ``val_test.*`` metric, the report JSON as ``report/<name>``, the plots; the bundle's
    registered version gets the key val_test metrics and this run id as tags."""
    text = Path(written).read_text()
    record = json.loads(text)
    bundle_id = str(record.get("bundle_id", ""))
    metrics = report_metrics(record)
    with tracking.run(context, name=run_name(context, bundle_id),
                      tags={"roadwork.bundle_id": bundle_id, **provenance_tags(record)}) as run:
        run.log(params={"policy_kind": record.get("policy_kind"), **params}, metrics=metrics)
        run.client.log_text(run.run_id, text, f"report/{name}")
        for plot in plots:
            run.log_artifact(plot, "plots")
    split = record.get("split", "val_test")
    tracking.tag_bundle_version(bundle_id, {
        **{f"{split}.{k}": metrics[f"{split}.{k}"] for k in VERSION_REPORT_KEYS
           if f"{split}.{k}" in metrics},
        "test_report_run_id": run.run_id})
    return run.run_id
