"""The checkpoint step as an external process: ``torchrun --standalone --nproc_per_node=N
-m roadwork_assets.pipes_entry.train_checkpoint``, launched by the checkpoint asset when
``trainer.launcher == "torchrun"`` (``defs/training/torchrun_launch.py``).

Every rank reads the job from the Pipes context's extras (trainer config, the embeddings
caches of train and val_select, the adapted backbone, the staged checkpoint path), joins
the process group torchrun describes (gloo on CPU, nccl on CUDA) and trains a
DistributedDataParallel replica on its slice of each epoch (``core.training.distributed``).
Rank 0 alone opens the Pipes message channel (one writer: the channel is one file, and
Dagster expects one "opened" and one "closed"), logs each epoch to the Dagster run, and
writes the checkpoint, atomically (``core.training.checkpoint.save_checkpoint``). The
other ranks write theirs to a scratch file that is deleted: the training function
writes what it trained, and every replica holds the same weights.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dagster_pipes import (
    PipesContext,
    PipesDefaultContextLoader,
    PipesEnvVarParamsLoader,
    open_dagster_pipes,
)

from roadwork_assets.core.progress import ProgressReporter, no_progress
from roadwork_assets.core.training import distributed
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import train_checkpoint
from roadwork_assets.core.training.shards import read_embedding_shards

EPOCH_MESSAGE = "epoch"  # custom message kind: one training-history row


def _extras() -> dict[str, Any]:
    """The Pipes context's extras without opening the message channel (ranks > 0)."""
    params = PipesEnvVarParamsLoader().load_context_params()
    with PipesDefaultContextLoader().load_context(params) as data:
        return dict(data["extras"])


def _train(extras: dict[str, Any], pipes: PipesContext | None) -> dict[str, Any]:
    cfg = TrainerConfig(**extras["trainer_config"])
    caches = {split: read_embedding_shards([Path(p) for p in paths], split)
              for split, paths in extras["embeddings"].items()}
    backbone = extras.get("adapted_backbone")
    with ExitStack() as stack:
        if pipes is None:  # not rank 0: same training, scratch output
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="rank_ckpt_"))
            dest = Path(scratch) / "model.pt"
        else:
            dest = Path(extras["dest"])

        def log(row: dict[str, float]) -> None:
            # the asset logs each row (run log + MLflow) when it reads these messages;
            # live, the progress lines below show the epochs going by
            if pipes is not None:
                pipes.report_custom_message({EPOCH_MESSAGE: row})

        progress = ProgressReporter(emit=pipes.log.info) if pipes is not None else no_progress
        result = train_checkpoint(caches, cfg, dest, log=log,
                                  adapted_backbone=Path(backbone) if backbone else None,
                                  progress=progress)
    return {"epoch": result.epoch, "best_metric": float(result.best_metric),
            "best_metric_name": result.best_metric_name,
            "history": json.loads(json.dumps(result.history, default=float)),
            "select_metrics": {k: float(v) for k, v in result.select_metrics.items()},
            "recipe": json.loads(json.dumps(result.recipe, default=str))}


def main() -> int:
    distributed.init_from_env()
    try:
        if distributed.rank() != 0:
            _train(_extras(), None)
            return 0
        with open_dagster_pipes() as pipes:
            pipes.log.info(f"rank 0 of {distributed.world_size()} "
                           f"(process group: {distributed.backend()})")
            summary = _train(pipes.extras, pipes)
            pipes.report_asset_materialization(metadata={
                "train_summary": {"raw_value": summary, "type": "json"},
                "world_size": {"raw_value": distributed.world_size(), "type": "int"},
                "launcher": {"raw_value": "torchrun", "type": "text"},
            })
        return 0
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
