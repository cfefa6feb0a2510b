"""Stage 2 assets: checkpoint + embeddings[split] -> multiview_views[split] (per-view logits
of the stage-1 model, ten forward passes per image, computed once) -> multiview_checkpoint
(aggregator fit on train views, chosen on val_select) -> multiview_logits[split]."""

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
from roadwork_assets.core.artifacts import code_version, file_sha256, read_npz, staged_path
from roadwork_assets.core.training.multiview import (
    compute_multiview_logits,
    compute_view_logits,
    fit_aggregator,
)
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.console import progress_reporter
from roadwork_assets.defs.partitions import BY_SPLIT, MODEL_FITTING_SPLITS, split_partitions
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import split_reads_check_spec
from roadwork_assets.defs.training.assets import LOGITS_CHECK, _logits_check

MULTIVIEW_CHECK = "multiview_checkpoint_loadable"
_ALIGNED = "finite; one row per split_manifest item, same order and labels"


@dg.asset(
    group_name="model",
    partitions_def=split_partitions,
    ins={"embeddings": dg.AssetIn(partition_mapping=BY_SPLIT)},  # every shard of the split
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("multiview_views"),
        dg.AssetCheckSpec(LOGITS_CHECK, asset="multiview_views", blocking=True,
                          description=_ALIGNED),
    ],
    description="[N, 10, 2] per-view logits of one split: the stage-1 model on ten-crop "
    "views (four corners + centre at 0.875, each flipped; frozen mode: the cached views).",
)
def multiview_views(
    context: dg.AssetExecutionContext,
    checkpoint: dict,
    embeddings: dict[str, Any],  # features memory-mapped (read_embeddings)
    split_manifest: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
):
    split = context.partition_key
    reg = artifacts.registry
    dest = asset_path(reg, "multiview_views", split)
    summary = compute_view_logits(checkpoint, embeddings, split, staged_path(dest),
                                  checkpoint_sha256=file_sha256(asset_path(reg, "checkpoint")),
                                  progress=progress_reporter(context))
    written = read_npz(staged_path(dest))
    data_version = str(written["data_version"])
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version,
        checks=[_logits_check(written, split_manifest)],
        metadata={"split": split, **summary, "data_version": data_version,
                  "skipped": str(written["skipped"]) or "not skipped",
                  "checkpoint_sha256": str(written["checkpoint_sha256"])})


@dg.asset(
    group_name="model",
    ins={"multiview_views": dg.AssetIn(partition_mapping=MODEL_FITTING_SPLITS)},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("multiview_checkpoint"),
        dg.AssetCheckSpec(MULTIVIEW_CHECK, asset="multiview_checkpoint", blocking=True,
                          description="loads and matches its schema "
                          "(contracts.multiview_schemas.MultiviewCheckpoint)"),
    ],
    description="Stage 2: the aggregator (mean, max, attention) over the stage-1 model's "
    "views, chosen on val_select NLL; attention fit on train; every aggregator compared "
    "with the single view on val_select (AUROC, balanced accuracy, miss rate at 0.5).",
)
def multiview_checkpoint(
    context: dg.AssetExecutionContext,
    multiview_views: dict[str, dict[str, np.ndarray]],
    artifacts: ArtifactRegistryResource,
):
    dest = asset_path(artifacts.registry, "multiview_checkpoint")
    staged = staged_path(dest)
    stage2 = fit_aggregator(multiview_views, dest=staged)
    loaded = _multiview_check(staged)
    table = pd.DataFrame([row.model_dump() for row in stage2.comparison])
    per_row = {f"val_select_{row.aggregator}_{k}": dg.MetadataValue.float(float(v))
               for row in stage2.comparison
               for k, v in (("auroc", row.auroc), ("balanced_accuracy", row.balanced_accuracy),
                            ("fnr", row.fnr), ("nll", row.nll)) if v is not None}
    context.log.info("stage 2 on val_select:\n" + table.round(4).to_string(index=False))
    return materialize_result(
        context, StagedFiles.at(dest), checks=[loaded], data_version=stage2.data_version,
        metadata={
            "aggregator": stage2.aggregator,
            "selection_metric": stage2.selection_metric,
            "view_source": stage2.view_source,
            "views": dg.MetadataValue.json(stage2.views),
            "crop_scale": dg.MetadataValue.float(stage2.crop_scale or 0.0),
            "input_size": stage2.input_size,
            "ten_crop_skipped_reason": stage2.ten_crop_skipped_reason or "not skipped",
            "comparison": dg.MetadataValue.md(table.round(4).to_markdown(index=False)),
            **per_row,
            "checkpoint_sha256": stage2.checkpoint_sha256,
            "data_version": stage2.data_version,
        },
    )


def _multiview_check(path: Path) -> dg.AssetCheckResult:
    try:
        stage2 = load_multiview_checkpoint(path)
    except ArtifactIntegrityError as exc:
        return dg.AssetCheckResult(check_name=MULTIVIEW_CHECK, passed=False,
                                   description=str(exc))
    return dg.AssetCheckResult(check_name=MULTIVIEW_CHECK, passed=True,
                               metadata={"aggregator": stage2.aggregator,
                                         "n_views": len(stage2.views)})


@dg.asset(
    group_name="model",
    partitions_def=split_partitions,
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("multiview_logits"),
        dg.AssetCheckSpec(LOGITS_CHECK, asset="multiview_logits", blocking=True,
                          description=_ALIGNED),
    ],
    description="[N, 1, 2] stage-2 logits of one split: its views pooled by the aggregator.",
)
def multiview_logits(
    context: dg.AssetExecutionContext,
    multiview_checkpoint: Path,
    multiview_views: dict[str, np.ndarray],
    split_manifest: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
):
    split = context.partition_key
    dest = asset_path(artifacts.registry, "multiview_logits", split)
    staged = staged_path(dest)
    summary = compute_multiview_logits(
        load_multiview_checkpoint(multiview_checkpoint), multiview_views, split, staged,
        multiview_sha256=file_sha256(multiview_checkpoint))
    written = read_npz(staged)
    data_version = str(written["data_version"])
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version,
        checks=[_logits_check(written, split_manifest)],
        metadata={"split": split, **summary, "data_version": data_version,
                  "checkpoint_sha256": str(written["checkpoint_sha256"]),
                  "multiview_checkpoint_sha256": str(written["multiview_checkpoint_sha256"])})
