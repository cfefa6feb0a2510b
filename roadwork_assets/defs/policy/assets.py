"""Exit-policy assets, each fitted on val_calib only (part A fits, part B thresholds).

A policy that cannot be fitted for a data reason (InsufficientDataError) still
materializes: its artifact is an `UnfittedPolicy` record (`fitted: false` and the
reason), so it never blocks the other policies or a bundle that ships another one.
"""


import json

import dagster as dg
import numpy as np

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    InsufficientDataError,
)
from roadwork_assets.contracts.policy_schemas import (
    POLICY_ASSET_NAMES,
    PolicyParams,
    UnfittedPolicy,
    parse_policy_artifact,
)
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    code_version,
    make_provenance,
    staged_path,
)
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.partitions import POLICY_FITTING_SPLITS
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.settings import used_settings
from roadwork_assets.defs.split_reads import split_reads_check_spec
from roadwork_assets.defs.tracking import MlflowTracking, log_policy

SCHEMA_CHECK = "schema_valid"

# policy kind -> what it is
_POLICY_WHAT = {
    "softmax": ("calibrated three-way exit (t_lo, t_hi) with an FNR "
                "guarantee from conformal risk control or Learn-then-Test"),
    "gate": ("learned failure gate on uncertainty features, compared "
             "with the max-probability baseline by AURC"),
    "scrc": ("split-conformal prediction sets (LAC and "
             "class-conditional); singletons exit, the rest defer"),
}
# asset name (contracts.policy_schemas.POLICY_ASSET_NAMES) -> (policy kind, what it is)
POLICY_ASSETS = {POLICY_ASSET_NAMES[kind]: (kind, what) for kind, what in _POLICY_WHAT.items()}


def policy_metadata(params: PolicyParams | UnfittedPolicy) -> dict[str, dg.MetadataValue]:
    raw = params.model_dump(mode="json")
    tables = _cascade_tables(raw)
    if raw.get("score_reference"):  # hundreds of scores: show their size, not the list
        ref = raw["score_reference"]
        raw["score_reference"] = {k: ref[k] for k in ("source", "n_positive", "n_negative", "stride")}
    meta: dict[str, dg.MetadataValue] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or value is None:
            meta[key] = dg.MetadataValue.text(str(value))
        elif isinstance(value, (int, float)):
            meta[key] = dg.MetadataValue.float(float(value))
        elif isinstance(value, str):
            meta[key] = dg.MetadataValue.text(value)
        else:
            meta[key] = dg.MetadataValue.json(value)
    if raw.get("calibrator_candidates"):
        rows = ["| method | held-out NLL | ECE | Brier |", "|---|---|---|---|"]
        rows += [f"| {c['method']} | {c['nll']:.4f} | {c['ece']:.4f} | {c['brier']:.4f} |"
                 for c in raw["calibrator_candidates"]]
        meta["calibrator_candidates"] = dg.MetadataValue.md("\n".join(rows))
    return {**meta, **tables}


def _cascade_tables(raw: dict) -> dict[str, dg.MetadataValue]:
    """A cascade's frontiers as markdown tables (popped from `raw`: hundreds of numbers)."""
    out = {}
    for key, cols in (("alpha_frontier", ("alpha", "feasible", "reward", "routing_rate",
                                          "latency_s", "lam", "rho", "exit_pos_floor")),
                      ("shape_candidates", ("rho", "exit_pos_floor", "lam", "reward",
                                            "routing_rate", "latency_s", "within_budget")),
                      ("frontier", ("lam", "certified", "crc_bound", "fnr", "reward",
                                    "routing_rate", "latency_s"))):
        rows = raw.pop(key, None)
        if not rows:
            continue
        step = max(1, len(rows) // 25)  # the lambda grid: every step-th point
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows[::step]]
        out[key] = dg.MetadataValue.md("\n".join(lines))
    return out


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _make_policy_asset(name: str, kind: str, what: str):
    @dg.asset(
        name=name,
        group_name="policy",
        ins={"logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS)},
        code_version=code_version(),
        check_specs=[
            split_reads_check_spec(name),
            dg.AssetCheckSpec(SCHEMA_CHECK, asset=name, blocking=True,
                              description="the JSON on disk validates against its schema"),
        ],
        description=f"Policy `{kind}` fitted on val_calib only: {what}.",
    )
    def _policy_asset(
        context: dg.AssetExecutionContext,
        logits: dict[str, dict[str, np.ndarray]],
        artifacts: ArtifactRegistryResource,
        exit_policy: ExitPolicyResource,
        mlflow: MlflowTracking,
    ):
        calib = logits["val_calib"]
        try:
            params = fit_policy(
                kind,
                calib["logits"],
                calib["labels"],
                calib["item_ids"].tolist(),
                # val_calib is split into fit / threshold parts by group key, so frames of
                # one scene (or near-duplicates) never sit on both sides
                groups=calib["group_keys"].tolist(),
                config=exit_policy.to_config(),
            )
        except InsufficientDataError as exc:  # a data reason: record it, block nothing else
            params = UnfittedPolicy(kind=kind, reason=str(exc), error=type(exc).__name__)
            context.log.warning(f"policy {kind!r} ({name}) could not be fitted: {exc}")
        params = params.model_copy(update={"provenance": make_provenance(
            str(calib["data_version"]), checkpoint_sha256=str(calib["checkpoint_sha256"]),
            settings=used_settings(exit_policy=exit_policy))})
        dest = asset_path(artifacts.registry, name)
        written = atomic_write_json(staged_path(dest), params)
        schema = schema_check(written)
        run_id = log_policy(mlflow, context, written, dest.name)
        return materialize_result(context, StagedFiles.at(dest), checks=[schema],
                                  data_version=params.provenance.data_version,
                                  metadata={**policy_metadata(params), "mlflow_run_id": run_id})

    return _policy_asset


def schema_check(path) -> dg.AssetCheckResult:
    """Re-read what was written and validate it as a reader (the bundle) will."""
    try:
        parsed = parse_policy_artifact(json.loads(path.read_text()))
    except (ArtifactIntegrityError, ValueError) as exc:
        return dg.AssetCheckResult(check_name=SCHEMA_CHECK, passed=False, description=str(exc))
    return dg.AssetCheckResult(check_name=SCHEMA_CHECK, passed=True,
                               metadata={"schema": type(parsed).__name__})


policy_assets = [_make_policy_asset(n, k, w) for n, (k, w) in POLICY_ASSETS.items()]
