"""The composition root: every asset and check of roadwork_assets, and the resources
they run with, built and wired here (``defs/`` only declares them)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.defs.automation import automation
from roadwork_assets.defs.data.assets import (
    source_images,
    split_assignment,
    split_manifest,
)
from roadwork_assets.defs.data.label_queue_asset import label_queue
from roadwork_assets.defs.evaluation.assets import test_report
from roadwork_assets.defs.evaluation.drift_asset import drift
from roadwork_assets.defs.export.assets import bundle
from roadwork_assets.defs.export.int8_asset import bundle_int8
from roadwork_assets.defs.freshness import with_automation
from roadwork_assets.defs.io_manager import RegistryIOManager
from roadwork_assets.defs.leakage_audit import assert_graph_obeys_policy
from roadwork_assets.defs.partitions import embedding_shards_from_env, shard_count, with_shards
from roadwork_assets.defs.policy.assets import policy_assets
from roadwork_assets.defs.policy.cascade_asset import cascade_policy
from roadwork_assets.defs.resources import (
    ArtifactRegistryResource,
    DatasetSource,
    ExitPolicyResource,
    TrainerResource,
    default_home,
    env_settings,
)
from roadwork_assets.defs.tracking import MlflowTracking
from roadwork_assets.defs.training.adapted_backbone_asset import adapted_backbone
from roadwork_assets.defs.training.assets import checkpoint, embeddings, logits
from roadwork_assets.defs.training.multiview_assets import (
    multiview_checkpoint,
    multiview_logits,
    multiview_views,
)

ALL_ASSETS = [
    source_images,
    split_assignment,
    split_manifest,
    embeddings,
    adapted_backbone,
    checkpoint,
    logits,
    multiview_views,
    multiview_checkpoint,
    multiview_logits,
    *policy_assets,
    cascade_policy,
    bundle,
    bundle_int8,
    test_report,
    drift,
    label_queue,
]


def resources_from_env() -> dict[str, object]:
    """Every resource, with the defaults the environment sets (``env_settings``)."""
    home = default_home()
    registry = ArtifactRegistry(Path(home))
    tracking_uri = os.environ.get("ROADWORK_MLFLOW_URI") or registry.mlflow_tracking_uri
    env = {group: {k: v for k, (v, _) in fields.items()}
           for group, fields in env_settings().items()}
    # one artifacts resource, shared: assets write where the IO manager reads
    artifacts = ArtifactRegistryResource(root=home)
    return {
        "io_manager": RegistryIOManager(artifacts=artifacts),
        "artifacts": artifacts,
        "dataset": DatasetSource(**env["dataset"]),
        "trainer": TrainerResource(**env["trainer"]),
        "exit_policy": ExitPolicyResource(),
        # artifacts under ROADWORK_HOME whatever the tracking URI (a server keeps its own)
        "mlflow": MlflowTracking(tracking_uri=tracking_uri,
                                 artifact_root=str(registry.mlflow_artifact_root)),
    }


def build_definitions(resources: dict[str, object] | None = None, *,
                      n_shards: int | None = None) -> dg.Definitions:
    """Definitions over ALL_ASSETS; refuses a graph whose partition mappings leak.

    ``n_shards``: shards per split of ``embeddings`` (default: ROADWORK_EMBEDDING_SHARDS,
    else 1), fixed here because a partitions definition is fixed when it loads."""
    resources = resources or resources_from_env()
    n_shards = embedding_shards_from_env() if n_shards is None else n_shards
    # jobs / schedules / sensors: the retrain triggers (defs/automation)
    # declarative automation: eager below the roots, run by the daemon (defs/freshness)
    assets = with_automation(with_shards(ALL_ASSETS, n_shards))
    # in-process executor: a run from the UI or `dagster asset materialize` executes its
    # steps in the run's own process, as `roadwork run` does, instead of one process per
    # step (the multiprocess default), each importing torch again
    built = dg.Definitions(assets=assets, resources=resources,
                           executor=dg.in_process_executor,
                           **automation(assets, resources))
    assert_graph_obeys_policy(built)
    return built


defs = build_definitions()


def current_definitions() -> dg.Definitions:
    """``defs``, unless the environment's ROADWORK_HOME (or ROADWORK_EMBEDDING_SHARDS) is
    no longer the one ``defs`` was built for (a long-lived process: a notebook, the test
    suite); then a fresh build, so `roadwork run` writes where it says it does."""
    built = globals()["defs"]
    artifacts = built.resources.get("artifacts") if built.resources else None
    if isinstance(artifacts, ArtifactRegistryResource) and \
            Path(artifacts.root).expanduser() != Path(default_home()).expanduser():
        return build_definitions()
    if definitions_shards(built) != embedding_shards_from_env():
        return build_definitions()
    return built


def definitions_shards(built: dg.Definitions) -> int:
    """Shards per split of ``embeddings`` in ``built`` (1 when it has no sharded asset)."""
    graph = built.resolve_asset_graph()
    return next((n for n in (shard_count(graph.get(k).partitions_def)
                             for k in graph.get_all_asset_keys()) if n is not None), 1)
