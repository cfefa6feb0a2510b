"""The settings of a run: defaults < environment variables < run config, field by field.

Dagster replaces a whole resource when run config names it, so a partial
``{"trainer": {"config": {"epochs": 2}}}`` used to drop what ``ROADWORK_WEIGHTS`` had
set. ``resolve_settings`` merges per field instead, validates every group through the
same pydantic models the resources use (the trainer's are ``TrainerConfig``'s fields),
checks that named files exist, and refuses what cannot be honoured — all before the
first asset runs. ``roadwork run`` then hands Dagster the complete, resolved config of
every group, so nothing is left for Dagster to replace.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import ValidationError

from roadwork_assets.contracts.errors import BadInputError, RoadworkError
from roadwork_assets.core.artifacts import settings_record, settings_sha256
from roadwork_assets.core.data.multi_source import parse_source_specs
from roadwork_assets.core.training.adapter_config import PRETRAINED_MODES
from roadwork_assets.defs.resources import (
    DatasetSource,
    ExitPolicyResource,
    TrainerResource,
    env_settings,
)

GROUPS: dict[str, type[dg.ConfigurableResource]] = {
    "dataset": DatasetSource,
    "trainer": TrainerResource,
    "exit_policy": ExitPolicyResource,
}
# resources run config may not set: they follow the environment, which the lock and the
# artifact root are tied to
FIXED = {
    "artifacts": "set ROADWORK_HOME instead",
    "io_manager": "set ROADWORK_HOME instead",
    "mlflow": "set ROADWORK_MLFLOW_URI instead",
}
TOP_LEVEL = ("resources", "loggers")
RUN_CONFIG = "--config-json"


class SettingsError(RoadworkError):
    """A setting is unknown, invalid, or contradicts another one."""


@dataclass(frozen=True)
class ResolvedSettings:
    values: dict[str, dict[str, Any]]  # group -> every field's value
    sources: dict[str, dict[str, str]]  # group -> field -> where a non-default came from
    loggers: dict[str, Any]

    def run_config(self, resource_keys: set[str] | None = None) -> dict[str, Any]:
        """Dagster run config holding every group in full (only resources the job has)."""
        groups = {g: v for g, v in self.values.items()
                  if resource_keys is None or g in resource_keys}
        config: dict[str, Any] = {"resources": {g: {"config": v} for g, v in groups.items()}}
        if self.loggers:
            config["loggers"] = self.loggers
        return config

    def record(self) -> dict[str, dict[str, Any]]:
        return settings_record(self.values)

    def header_lines(self) -> list[str]:
        """One line per group: its hash (as stamped in artifacts), values, and where the
        non-default values came from."""
        lines = []
        for group, values in self.values.items():
            origin = ", ".join(f"{k} from {src}" for k, src in sorted(self.sources[group].items()))
            lines.append(f"[roadwork] settings {group} sha256={settings_sha256(values)} "
                         f"{json.dumps(values, sort_keys=True, default=str)}"
                         + (f" ({origin})" if origin else " (all defaults)"))
        return lines


def _valid(names) -> str:
    return ", ".join(sorted(names))


def _where(group: str, field: str, sources: dict[str, str]) -> str:
    src = sources.get(field)
    if src == RUN_CONFIG:
        return f"{RUN_CONFIG} resources.{group}.config.{field}"
    if src:
        return f"{src} ({group}.{field})"
    return f"{group}.{field} (default)"


def resolve_settings(run_config: Any, environ: dict[str, str] | None = None) -> ResolvedSettings:
    """Merge defaults < env < run config per field and validate everything, or raise one
    ``SettingsError`` naming the setting and the fix."""
    environ = os.environ if environ is None else environ
    if not isinstance(run_config, dict):
        raise SettingsError(f"{RUN_CONFIG} must be a JSON object like "
                            '{"resources": {"trainer": {"config": {"epochs": 5}}}}')
    unknown = sorted(set(run_config) - set(TOP_LEVEL))
    if unknown:
        raise SettingsError(f"{RUN_CONFIG}: unknown top-level key(s) {unknown}; valid: "
                            f"{_valid(TOP_LEVEL)}")
    resources = run_config.get("resources") or {}
    if not isinstance(resources, dict):
        raise SettingsError(f"{RUN_CONFIG}: 'resources' must be an object of {_valid(GROUPS)}")
    for name in resources:
        if name in FIXED:
            raise SettingsError(f"{RUN_CONFIG}: resource {name!r} is not set by run config: "
                                f"{FIXED[name]}")
        if name not in GROUPS:
            raise SettingsError(f"{RUN_CONFIG}: unknown resource {name!r}; valid: "
                                f"{_valid(GROUPS)}")
    env = env_settings(environ)
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for group, cls in GROUPS.items():
        block = resources.get(group) or {}
        if not isinstance(block, dict) or set(block) - {"config"}:
            raise SettingsError(f"{RUN_CONFIG}: resources.{group} must be "
                                '{"config": {...}}' + f"; got {json.dumps(block)[:80]}")
        given = block.get("config") or {}
        if not isinstance(given, dict):
            raise SettingsError(f"{RUN_CONFIG}: resources.{group}.config must be an object")
        bad = sorted(set(given) - set(cls.model_fields))
        if bad:
            raise SettingsError(f"{RUN_CONFIG}: unknown {group} setting(s) {bad}; valid: "
                                f"{_valid(cls.model_fields)}")
        merged = {k: v for k, (v, _) in env[group].items()}
        src = {k: s for k, (_, s) in env[group].items()}
        merged.update(given)
        src.update({k: RUN_CONFIG for k in given})
        values[group] = _validate(group, cls, merged, src)
        sources[group] = src
    _check_conflicts(values, sources, env)
    _check_files(values, sources)
    loggers = run_config.get("loggers") or {}
    return ResolvedSettings(values=values, sources=sources, loggers=loggers)


def _validate(group: str, cls, merged: dict[str, Any], src: dict[str, str]) -> dict[str, Any]:
    try:
        resource = cls(**merged)  # TrainerResource carries TrainerConfig's own validators
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if not field:
            raise SettingsError(f"{group}: {msg}") from None
        raise SettingsError(f"{_where(group, field, src)} = {err.get('input')!r}: {msg}; "
                            "fix that value") from None
    return {k: getattr(resource, k) for k in cls.model_fields}


def _check_conflicts(values, sources, env) -> None:
    # ROADWORK_WEIGHTS makes frozen the default mode; run config may pick another mode
    # that reads the weights (lora, dora, explora), but not end_to_end, which ignores them
    trainer, tsrc = values["trainer"], sources["trainer"]
    if "weights_path" in env["trainer"] and trainer["mode"] not in PRETRAINED_MODES:
        raise SettingsError(
            f"ROADWORK_WEIGHTS is set but {RUN_CONFIG} sets trainer.mode={trainer['mode']}, "
            "which would ignore the weights: unset ROADWORK_WEIGHTS, drop trainer.mode, or "
            f"pick a mode that reads them ({', '.join(PRETRAINED_MODES)})")
    if trainer["weights_path"] and trainer["mode"] not in PRETRAINED_MODES:
        raise SettingsError(
            f"{_where('trainer', 'weights_path', tsrc)} is set but trainer.mode="
            f"{trainer['mode']} never reads weights: set trainer.mode to one of "
            f"{', '.join(PRETRAINED_MODES)} or drop it")


def _check_files(values, sources) -> None:
    spec = values["dataset"]["spec"]
    try:
        specs = parse_source_specs(spec)
    except BadInputError as exc:
        raise SettingsError(f"{_where('dataset', 'spec', sources['dataset'])}: {exc}") from None
    for k, source in enumerate(specs):
        if not Path(source.path).expanduser().exists():
            which = (f" (source {source.name!r}, entry {k + 1} of {len(specs)}: "
                     f"{source.path})" if len(specs) > 1 else "")
            raise SettingsError(
                f"{_where('dataset', 'spec', sources['dataset'])} = {spec}{which}: "
                "no such file or folder; point it at a class-folder tree, "
                "a CSV/parquet manifest or NATIX parquet")
    _check_source_names(values["dataset"], [s.name for s in specs])
    weights = values["trainer"]["weights_path"]
    if weights and not Path(weights).expanduser().is_file():
        raise SettingsError(f"{_where('trainer', 'weights_path', sources['trainer'])} = "
                            f"{weights}: no such file; point it at a local .safetensors/.pth "
                            "weights file")


def _check_source_names(dataset: dict[str, Any], names: list[str]) -> None:
    """holdout_source and source_weights must name sources ROADWORK_DATA lists."""
    if not names:
        names = ["default"]  # the generated default dataset's one source
    holdout = dataset["holdout_source"]
    if holdout is not None and (holdout not in names or len(names) < 2):
        raise SettingsError(
            f"dataset.holdout_source = {holdout!r} needs a second source to train on and must "
            f"name one of the sources of dataset.spec / ROADWORK_DATA: {names}")
    if dataset["source_balance"] == "weights":
        weights = dataset["source_weights"]
        unknown = sorted(set(weights) - set(names))
        missing = sorted(set(names) - set(weights) - {holdout})
        bad = {k: v for k, v in weights.items() if not v > 0}
        if unknown or missing or bad:
            raise SettingsError(
                f"dataset.source_weights = {weights}: every source needs a weight > 0 "
                f"(sources: {names}; unknown {unknown}, missing {missing}, not > 0 "
                f"{sorted(bad)})")


def used_settings(**resources: dg.ConfigurableResource) -> dict[str, dict[str, Any]]:
    """The settings record of the resources an asset used, for its provenance stamp."""
    return settings_record({name: {k: getattr(res, k) for k in type(res).model_fields}
                            for name, res in resources.items()})


def merge_records(*records: dict[str, Any] | None) -> dict[str, Any]:
    """Union of settings records (an artifact inherits its inputs' settings)."""
    out: dict[str, Any] = {}
    for record in records:
        out.update(record or {})
    return dict(sorted(out.items()))
