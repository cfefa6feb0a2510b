"""The checkpoint asset's ``trainer.launcher == "torchrun"`` branch: training as an
external ``torchrun --standalone --nproc_per_node=N`` process, through Dagster Pipes.

``dg.PipesSubprocessClient`` passes the job as Pipes extras (the trainer config, the
embeddings caches' paths, the adapted backbone, the staged checkpoint path), streams the
process's Pipes logs into the run, and hands back what it reported: one custom message
per training epoch (forwarded to ``log``: run log + MLflow, as in process) and a
materialization whose metadata this module returns for the asset's own. The inputs are
still loaded by the asset through the IO manager, so the split-read ledger records them
as before; the external process reads the same files by path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported by dagster

from roadwork_assets.contracts.errors import RoadworkError
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.shards import shard_paths
from roadwork_assets.core.training.trainer import TrainResult
from roadwork_assets.pipes_entry import train_checkpoint as entry

FITTING_SPLITS = ("train", "val_select")
PIPES_CLOSED_WITH_EXCEPTION = "[pipes] external process pipes closed with exception"


class ExternalTrainingFailed(RoadworkError):
    """The torchrun training process failed; carries the error it reported."""


def torchrun_command(nproc_per_node: int) -> list[str]:
    """``torchrun`` of this interpreter (``python -m torch.distributed.run`` is the same
    entry point, and needs no PATH lookup), single node, N ranks, the Pipes entry."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "-m", entry.__name__]


def train_with_torchrun(
    context: dg.AssetExecutionContext,
    cfg: TrainerConfig,
    registry: ArtifactRegistry,
    staged: Path,
    adapted_backbone: Path | None,
    log: Callable[[dict[str, float]], None],
) -> tuple[TrainResult, dict[str, Any]]:
    """Run the external training; return its result (no model object: the checkpoint
    at ``staged`` holds the weights) and the metadata it reported."""
    extras = {
        "trainer_config": cfg.model_dump(mode="json"),
        # each split's shard files, in shard order (the asset's input checked them)
        "embeddings": {s: [str(p) for p in shard_paths(registry, s)] for s in FITTING_SPLITS},
        "adapted_backbone": str(adapted_backbone) if adapted_backbone else None,
        "dest": str(staged),
    }
    try:
        invocation = dg.PipesSubprocessClient().run(
            context=context, command=torchrun_command(cfg.nproc_per_node), extras=extras)
    except DagsterPipesExecutionError as exc:
        reported = "; ".join(_reported_errors(context)) or (
            "it reported no error through Pipes (a rank other than 0 failed, or the process "
            "was killed): see the step's stderr")
        raise ExternalTrainingFailed(f"torchrun training of checkpoint failed ({exc}): "
                                     f"{reported}") from None
    for message in invocation.get_custom_messages():
        if isinstance(message, dict) and entry.EPOCH_MESSAGE in message:
            log(message[entry.EPOCH_MESSAGE])
    reported = invocation.get_materialize_result().metadata
    summary = reported["train_summary"].value
    result = TrainResult(model=None, epoch=int(summary["epoch"]),
                         best_metric=float(summary["best_metric"]),
                         best_metric_name=str(summary["best_metric_name"]),
                         history=summary["history"], select_metrics=summary["select_metrics"],
                         recipe=summary["recipe"])
    metadata = {"launcher": "torchrun", "world_size": reported["world_size"].value,
                "pipes_reported": dg.MetadataValue.json(sorted(reported))}
    return result, metadata


def _reported_errors(context: dg.AssetExecutionContext) -> list[str]:
    """The exceptions the external process reported when it closed Pipes (Dagster logs
    them as engine events of this step), one line each."""
    step_key = context.op_execution_context.get_step_execution_context().step.key
    out = []
    for record in context.instance.all_logs(context.run_id,
                                            of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.get_dagster_event()
        error = event.event_specific_data.error if event.event_specific_data else None
        if event.step_key == step_key and event.message == PIPES_CLOSED_WITH_EXCEPTION \
                and error is not None:
            out.append(" ".join(error.message.split()))
    return out
