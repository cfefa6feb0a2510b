"""The Definitions object: every asset, check and resource of roadwork_assets."""

from __future__ import annotations

import dagster as dg

from roadwork_assets.defs.data.assets import source_images, split_assignment, split_manifest
from roadwork_assets.defs.evaluation.assets import test_report
from roadwork_assets.defs.export.assets import bundle
from roadwork_assets.defs.leakage_audit import assert_graph_obeys_policy
from roadwork_assets.defs.policy.assets import policy_assets
from roadwork_assets.defs.resources import resources_from_env
from roadwork_assets.defs.training.assets import checkpoint, embeddings, logits

ALL_ASSETS = [
    source_images,
    split_assignment,
    split_manifest,
    embeddings,
    checkpoint,
    logits,
    *policy_assets,
    bundle,
    test_report,
]


def build_definitions(resources: dict[str, object] | None = None) -> dg.Definitions:
    """Definitions over ALL_ASSETS; refuses a graph whose partition mappings leak."""
    built = dg.Definitions(assets=ALL_ASSETS, resources=resources or resources_from_env())
    assert_graph_obeys_policy(built)
    return built


defs = build_definitions()
