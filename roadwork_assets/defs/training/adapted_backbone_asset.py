"""adapted_backbone: ExPLoRA's continued self-supervised pre-training (mode explora).

It reads embeddings[train] only (the train split's decoded images; labels unused) plus
the optional ``trainer.explora_unlabelled_dir``; the split policy (model fitting, train
only) and the leakage audit hold it to that. In any other mode it writes a record that
it was not used, in milliseconds, so the default run costs what it did.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.core.artifacts import code_version, staged_path
from roadwork_assets.core.training.adapted_backbone import (
    build_adapted_backbone,
    load_adapted_backbone,
)
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.console import progress_reporter
from roadwork_assets.defs.partitions import TRAIN_ONLY, shards_of
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, DatasetSource, TrainerResource
from roadwork_assets.defs.split_reads import split_reads_check_spec

ADAPTED_CHECK = "adapted_backbone_loadable"


@dg.asset(
    group_name="model",
    ins={"embeddings": dg.AssetIn(partition_mapping=shards_of(TRAIN_ONLY))},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("adapted_backbone"),
        dg.AssetCheckSpec(ADAPTED_CHECK, asset="adapted_backbone", blocking=True,
                          description="loads with weights_only=True and matches its schema "
                          "(contracts.adaptation_schemas.AdaptedBackboneMeta)"),
    ],
    description="ExPLoRA (mode explora): the pretrained ViT after continued DINO-style "
    "self-distillation on the train split's images (+ an optional unlabelled folder), one "
    "or two blocks unfrozen and LoRA elsewhere, merged. Other modes: a not-used record.",
)
def adapted_backbone(
    context: dg.AssetExecutionContext,
    embeddings: dict[str, dict[str, Any]],  # features memory-mapped (read_embeddings)
    artifacts: ArtifactRegistryResource,
    trainer: TrainerResource,
    dataset: DatasetSource,
):
    cfg = trainer.to_config()
    dest = asset_path(artifacts.registry, "adapted_backbone")
    # a labelled dataset folder holds every split: the unlabelled folder may not overlap it
    labelled = [Path(dataset.spec)] if dataset.spec and Path(dataset.spec).is_dir() else []

    def log(row: dict[str, float]) -> None:
        context.log.info(" ".join(f"{k}={v:.4g}" for k, v in row.items()))

    cfg.apply_threads()
    meta = build_adapted_backbone(embeddings["train"], cfg, staged_path(dest),
                                  forbidden_roots=labelled, log=log,
                                  progress=progress_reporter(context))
    history = meta.history
    return materialize_result(
        context, StagedFiles.at(dest), checks=[_adapted_check(staged_path(dest))],
        data_version=meta.data_version or None,
        metadata={
            "used": meta.used,
            "reason": meta.reason,
            "mode": meta.mode,
            "objective": meta.objective or "none",
            "n_train_images": meta.n_train_images,
            "n_unlabelled_images": meta.n_unlabelled_images,
            "unfrozen_blocks": dg.MetadataValue.json(meta.unfrozen_blocks),
            "n_adapted_modules": meta.n_adapted_modules,
            "trainable_params": meta.trainable_params,
            **({"ssl_loss_first": history[0]["ssl_loss"], "ssl_loss_last": history[-1]["ssl_loss"],
                "ssl_kl_first": history[0]["ssl_kl"], "ssl_kl_last": history[-1]["ssl_kl"]}
               if history else {}),
        },
    )


def _adapted_check(path: Path) -> dg.AssetCheckResult:
    try:
        meta, state = load_adapted_backbone(path)
    except ArtifactIntegrityError as exc:
        return dg.AssetCheckResult(check_name=ADAPTED_CHECK, passed=False, description=str(exc))
    return dg.AssetCheckResult(check_name=ADAPTED_CHECK, passed=True,
                               metadata={"used": meta.used, "n_tensors": len(state)})
