"""label_queue: which unlabelled images to label next, as a Label Studio import.

The served bundle scores a folder of unlabelled images (ROADWORK_UNLABELLED or the
asset's `pool` config); ``core.data.active_learning`` ranks them by the bundle's
uncertainty times a novelty factor (diversity), and ``core.data.labelstudio`` writes the top-k
as import tasks with the model's answer as pre-annotation. Labels come back through
``core.data.labelstudio.import_export``, which never relabels an image of a split.

Split policy: it reads no split partition, only the bundle (role "active learning",
which may never carry val_test: what gets labelled next must not depend on the
held-out test set, or test results would leak into the next training set).
"""

import os
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from roadwork_assets.core.artifacts import (
    atomic_write_json,
    atomic_write_text,
    code_version,
    combine_versions,
    staged_path,
)
from roadwork_assets.core.data.active_learning import ActiveLearningConfig, pool_files, score_pool
from roadwork_assets.core.data.active_learning import label_queue as rank_queue
from roadwork_assets.core.data.labelstudio import LABEL_CONFIG, queue_tasks
from roadwork_assets.core.export.bundle import load_bundle
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.metadata import table_md
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource
from roadwork_assets.defs.split_reads import split_reads_check_spec

POOL_ENV = "ROADWORK_UNLABELLED"
_DEFAULTS = ActiveLearningConfig()


class LabelQueueSettings(dg.Config):
    """label_queue's settings (launchpad / run config), as ActiveLearningConfig reads them."""

    pool: str | None = Field(None, description=f"folder of unlabelled images; None = "
                             f"${POOL_ENV}; neither set = an empty queue")
    top_k: int = Field(_DEFAULTS.top_k, ge=1, description="images exported for labelling")
    diversity: float = Field(_DEFAULTS.diversity, ge=0, le=8, description="β, exponent of "
                             "the novelty factor: 0 = uncertainty only; larger = fewer "
                             "similar images")
    batch_size: int = Field(_DEFAULTS.batch_size, ge=1)
    url_root: str = Field(_DEFAULTS.url_root, description="Label Studio's "
                          "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: image URLs are "
                          "/data/local-files/?d=<path relative to it>")

    def to_config(self) -> ActiveLearningConfig:
        return ActiveLearningConfig(top_k=self.top_k, diversity=self.diversity,
                                    batch_size=self.batch_size, url_root=self.url_root)

    def pool_folder(self) -> str | None:
        return self.pool or os.environ.get(POOL_ENV) or None


def _write_outputs(dest: Path, tasks: list[dict], queue) -> dict[str, dg.MetadataValue]:
    atomic_write_json(staged_path(dest), tasks)
    config = atomic_write_text(dest.with_name("label_config.xml"), LABEL_CONFIG)
    table = dest.with_name("queue.csv")
    atomic_write_text(table, queue.to_csv(index=False))
    return {"label_config": dg.MetadataValue.path(str(config)),
            "queue_table": dg.MetadataValue.path(str(table)),
            "n_queued": dg.MetadataValue.int(len(tasks))}


@dg.asset(
    group_name="data",
    ins={"bundle": dg.AssetIn()},
    code_version=code_version(),
    check_specs=[split_reads_check_spec("label_queue")],
    description="Unlabelled pool (ROADWORK_UNLABELLED or config `pool`) ranked by the "
    "served bundle's uncertainty (the gate's P(wrong), else the calibrated max-prob) with "
    "a novelty factor on the model's embeddings, so one scene's frames do not fill "
    "the queue; the top-k as Label Studio import JSON (tasks.json, choices pre-annotation "
    "roadwork / none) with its labelling config (label_config.xml).",
)
def label_queue(
    context: dg.AssetExecutionContext,
    config: LabelQueueSettings,
    bundle: Path,
    artifacts: ArtifactRegistryResource,
):
    dest = asset_path(artifacts.registry, "label_queue")
    cfg = config.to_config()
    folder = config.pool_folder()
    if folder is None:
        why = f"no unlabelled pool (set {POOL_ENV} or the asset's `pool` config)"
        context.log.info(f"label_queue empty: {why}")
        meta = _write_outputs(dest, [], pd.DataFrame())
        return materialize_result(context, StagedFiles.at(dest), data_version=None,
                                  metadata={**meta, "why_empty": why})
    files = pool_files(folder)
    loaded = load_bundle(Path(bundle), check_onnx=False)
    scores = score_pool(loaded, files, cfg)
    for failed in scores.failed[:10]:
        context.log.warning(f"pool image skipped: {failed['path']}: {failed['reason']}")
    queue = rank_queue(scores, cfg)
    tasks = queue_tasks(queue, loaded.manifest.bundle_id, cfg.url_root)
    meta = _write_outputs(dest, tasks, queue)
    shown = queue.assign(file=[Path(p).name for p in queue["path"]])[
        ["rank", "file", "uncertainty", "probability", "prediction", "max_similarity_to_earlier"]]
    version = combine_versions({
        "bundle": loaded.manifest.bundle_id, "settings": cfg.model_dump_json(),
        "pool": combine_versions({str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                  for p in files})})
    return materialize_result(
        context, StagedFiles.at(dest), data_version=version,
        metadata={**meta, "queue": table_md(shown.round(4), limit=cfg.top_k),
                  "pool": dg.MetadataValue.path(str(folder)),
                  "n_pool": dg.MetadataValue.int(len(files)),
                  "n_unreadable": dg.MetadataValue.int(len(scores.failed)),
                  "unreadable": dg.MetadataValue.json(scores.failed[:20]),
                  "bundle_id": loaded.manifest.bundle_id,
                  "settings": dg.MetadataValue.json(cfg.model_dump())})
