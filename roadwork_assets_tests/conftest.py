"""Shared fixtures: tiny, fast settings for materializing the real graph."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DAGSTER_TELEMETRY_DISABLED", "1")


def random_backbone_weights(model_name: str, path, seed: int = 0):
    """A timm backbone's state dict with random weights (seeded), saved as safetensors the
    way users get pretrained files; returns ``path``."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def tiny_resources(root, *, n_images: int = 800, alpha: float = 0.05, epochs: int = 16,
                   bundle_policy: str = "cascade", export_onnx: bool = True) -> dict:
    """Real resources over a tmp root: small generated dataset, short training."""
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.defs.io_manager import RegistryIOManager
    from roadwork_assets.defs.resources import (
        ArtifactRegistryResource,
        DatasetSource,
        ExitPolicyResource,
        TrainerResource,
    )
    from roadwork_assets.defs.tracking import MlflowTracking

    root = str(root)
    artifacts = ArtifactRegistryResource(root=root)
    return {
        "io_manager": RegistryIOManager(artifacts=artifacts),
        "artifacts": artifacts,
        "dataset": DatasetSource(default_n_images=n_images, default_image_size=64),
        "trainer": TrainerResource(img_size=64, epochs=epochs, batch_size=64, threads=2),
        "exit_policy": ExitPolicyResource(alpha=alpha, bundle_policy=bundle_policy,
                                          export_onnx=export_onnx, cascade_alphas=[0.05, 0.2],
                                          # measured latencies: a loaded CI machine measured
                                          # 1.02 s for the tiny stage 1 (OpenMP contention),
                                          # over the 1 s default, which refuses the cascade
                                          latency_budget_s=30.0),
        "mlflow": MlflowTracking(
            experiment_name="roadwork_tests",
            tracking_uri=ArtifactRegistry(root).mlflow_tracking_uri,
            artifact_root=str(ArtifactRegistry(root).mlflow_artifact_root),
        ),
    }


@pytest.fixture(scope="session")
def materialized_root(tmp_path_factory):
    """The whole graph materialized once per session on a tiny generated dataset."""
    import dagster as dg

    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.runner import materialize_all

    root = tmp_path_factory.mktemp("roadwork_home")
    defs = build_definitions(tiny_resources(root))
    with dg.DagsterInstance.ephemeral() as instance:
        results = materialize_all(defs, instance, say=lambda _m: None)
    return root, defs, results
