"""Training assets: embeddings[shard|split] -> checkpoint (train + val_select) -> logits[split]."""

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.splits import parse_shard_key
from roadwork_assets.core.artifacts import (
    code_version,
    file_sha256,
    frame_fingerprint,
    read_npz,
    staged_path,
)
from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.pipeline import compute_logits, train_checkpoint
from roadwork_assets.core.training.shards import ShardSpec, compute_embedding_shard
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.console import progress_reporter
from roadwork_assets.defs.metadata import floats
from roadwork_assets.defs.partitions import (
    BY_SPLIT,
    MODEL_FITTING_SPLITS,
    embedding_partitions,
    shard_count,
    shards_of,
    split_partitions,
)
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, TrainerResource
from roadwork_assets.defs.split_reads import split_reads_check_spec
from roadwork_assets.defs.tracking import MlflowTracking
from roadwork_assets.defs.training.torchrun_launch import train_with_torchrun


@dg.asset(
    group_name="model",
    # split x shard: shards of one split are independent runs (ROADWORK_EMBEDDING_SHARDS)
    partitions_def=embedding_partitions(1),
    ins={"split_manifest": dg.AssetIn(partition_mapping=BY_SPLIT)},
    code_version=code_version(),
    check_specs=[split_reads_check_spec("embeddings")],
    description="Frozen-stage cache of one shard of one split (a contiguous block of its "
    "manifest's rows): pretrained-backbone features per view (frozen mode) or decoded, "
    "resized uint8 images (end_to_end mode). Readers get the whole split.",
)
def embeddings(
    context: dg.AssetExecutionContext,
    split_manifest: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
    trainer: TrainerResource,
):
    split, shard = parse_shard_key(context.partition_key)
    spec = ShardSpec(n_shards=shard_count(context.assets_def.partitions_def), shard=shard)
    dest = asset_path(artifacts.registry, "embeddings", context.partition_key)
    # the versions split_manifest stamped into its parquet footer: one source of truth
    stamp = split_manifest.attrs.get("provenance", {})
    data_version = stamp.get("data_version") or frame_fingerprint(split_manifest)
    assignment_version = stamp.get("assignment_version", "")
    summary = compute_embedding_shard(split_manifest, trainer.to_config(), staged_path(dest),
                                      split, spec, data_version, assignment_version,
                                      progress=progress_reporter(context))
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version,
        metadata={
            "split": split,
            "shard": shard,
            "n_shards": spec.n_shards,
            "rows": dg.MetadataValue.json(summary["rows"]),
            "kind": summary["kind"],
            "shape": dg.MetadataValue.json(summary["shape"]),
            "n_positive": summary["n_positive"],
            "n_negative": summary["n_negative"],
            "backbone": trainer.backbone,
            **summary["embed_engine"],  # engine that embedded + img/s (core.training.embed_engine)
            "data_version": data_version,
            "assignment_version": assignment_version,
        },
    )


CHECKPOINT_CHECK = "checkpoint_loadable"


@dg.asset(
    group_name="model",
    # adapted_backbone: ExPLoRA's backbone, read in mode explora only (else a not-used record)
    ins={"embeddings": dg.AssetIn(partition_mapping=shards_of(MODEL_FITTING_SPLITS)),
         "adapted_backbone": dg.AssetIn()},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("checkpoint"),
        dg.AssetCheckSpec(CHECKPOINT_CHECK, asset="checkpoint", blocking=True,
                          description="loads with weights_only=True and matches its schema "
                          "(contracts.schemas.CheckpointMeta)"),
    ],
    description="The classifier, fit on train and selected on val_select only.",
)
def checkpoint(
    context: dg.AssetExecutionContext,
    embeddings: dict[str, dict[str, Any]],  # features memory-mapped (read_embeddings)
    adapted_backbone: Path,
    artifacts: ArtifactRegistryResource,
    trainer: TrainerResource,
    mlflow: MlflowTracking,
):
    cfg = trainer.to_config()
    dest = asset_path(artifacts.registry, "checkpoint")
    staged = staged_path(dest)
    with mlflow.run(context) as run:
        run.log(params=cfg.model_dump())

        def log(row: dict[str, float]) -> None:
            context.log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()))
            run.log(metrics={k: v for k, v in row.items() if k != "epoch"},
                    step=int(row.get("epoch", 0)))

        launched: dict[str, object] = {}
        if cfg.launcher == "torchrun":  # external DDP process through Dagster Pipes
            result, launched = train_with_torchrun(context, cfg, artifacts.registry, staged,
                                                   adapted_backbone, log=log)
        else:
            result = train_checkpoint(embeddings, cfg, staged, log=log,
                                      adapted_backbone=adapted_backbone,
                                      progress=progress_reporter(context))
        run.log(metrics={f"best_{k}": v for k, v in result.select_metrics.items()},
                tags={"roadwork.checkpoint_sha256": file_sha256(staged)})
    loaded = _checkpoint_check(staged)
    return materialize_result(
        context, StagedFiles.at(dest), checks=[loaded],
        data_version=loaded.metadata["data_version"].value if loaded.passed else None,
        metadata={
            "mode": cfg.mode,
            "backbone": cfg.backbone,
            **launched,
            "epoch": result.epoch,
            "epochs_run": len(result.history),
            "best_metric": dg.MetadataValue.float(result.best_metric),
            "best_metric_name": result.best_metric_name,
            **{f"val_select_{k}": v for k, v in floats(result.select_metrics).items()},
            "history": dg.MetadataValue.md(pd.DataFrame(result.history).round(4).to_markdown(index=False)),
            "mlflow_run_id": run.run_id,
        },
    )


def _checkpoint_check(path: Path) -> dg.AssetCheckResult:
    try:
        payload = load_checkpoint(path)
    except ArtifactIntegrityError as exc:
        return dg.AssetCheckResult(check_name=CHECKPOINT_CHECK, passed=False,
                                   description=str(exc))
    return dg.AssetCheckResult(
        check_name=CHECKPOINT_CHECK,
        passed=True,
        metadata={"keys": dg.MetadataValue.json(sorted(payload)),
                  "n_tensors": len(payload["model_state_dict"]),
                  "data_version": payload["data_version"]},
    )


LOGITS_CHECK = "logits_finite_and_aligned"


@dg.asset(
    group_name="model",
    partitions_def=split_partitions,
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("logits"),
        dg.AssetCheckSpec(LOGITS_CHECK, asset="logits", blocking=True,
                          description="finite; one row per split_manifest item, same order "
                          "and labels"),
    ],
    ins={"embeddings": dg.AssetIn(partition_mapping=BY_SPLIT)},  # every shard of the split
    description="[N, views, 2] logits of one split from the checkpoint.",
)
def logits(
    context: dg.AssetExecutionContext,
    checkpoint: dict,
    embeddings: dict[str, Any],  # features memory-mapped (read_embeddings)
    split_manifest: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
    trainer: TrainerResource,
):
    split = context.partition_key
    reg = artifacts.registry
    dest = asset_path(reg, "logits", split)
    staged = staged_path(dest)
    summary = compute_logits(checkpoint, embeddings, split, staged,
                             checkpoint_sha256=file_sha256(asset_path(reg, "checkpoint")),
                             override=trainer.to_config(), progress=progress_reporter(context))
    written = read_npz(staged)
    aligned = _logits_check(written, split_manifest)
    data_version = str(written["data_version"])
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version, checks=[aligned],
        metadata={"split": split, **summary, "data_version": data_version,
                  "checkpoint_sha256": str(written["checkpoint_sha256"])})


def _logits_check(written: dict[str, np.ndarray], manifest: pd.DataFrame) -> dg.AssetCheckResult:
    """Compare written logits with the split's manifest (not with the cache they came from)."""
    z = written["logits"]
    problems = []
    bad_rows = np.flatnonzero(~np.isfinite(z).all(axis=(1, 2)))
    if len(bad_rows):
        ids = written["item_ids"][bad_rows[:10]].tolist()
        problems.append(f"{len(bad_rows)} item(s) with NaN/inf logits, e.g. {ids}")
    ids = manifest["item_id"].astype(str).to_numpy()
    labels = manifest["label"].to_numpy(np.int8)
    if len(z) != len(ids) or not np.array_equal(written["item_ids"].astype(str), ids):
        problems.append("item ids differ from split_manifest (order or membership): "
                        "re-materialize embeddings and logits for this split")
    elif not np.array_equal(written["labels"], labels):
        problems.append("labels differ from split_manifest: re-materialize embeddings")
    return dg.AssetCheckResult(
        check_name=LOGITS_CHECK,
        passed=not problems,
        description="; ".join(problems) or "finite and aligned with split_manifest",
        metadata={"n": len(z), "shape": dg.MetadataValue.json(list(z.shape))},
    )
