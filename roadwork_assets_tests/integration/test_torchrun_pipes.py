"""trainer.launcher = "torchrun": the checkpoint step trains in an external
``torchrun --standalone --nproc_per_node=1`` process (gloo on CPU, the model under
DistributedDataParallel) launched through the real ``dg.PipesSubprocessClient`` in a
real materialization, which reads back its logs, epoch rows and reported metadata.
"""

from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
import torch

from roadwork_assets.core.training.checkpoint import load_checkpoint
from roadwork_assets.core.training.pipeline import model_from_checkpoint
from roadwork_assets.definitions import build_definitions
from roadwork_assets.defs.resources import TrainerResource
from roadwork_assets.defs.runner import run_stage
from roadwork_assets_tests.conftest import tiny_resources

TRAINER = {"img_size": 32, "epochs": 2, "batch_size": 64, "threads": 2}


def _job(root, **trainer) -> dg.JobDefinition:
    # 320 images, alpha 0.2: the smallest set whose val_calib the split checks accept
    resources = tiny_resources(root, n_images=320, alpha=0.2, epochs=2)
    resources["trainer"] = TrainerResource(**{**TRAINER, **trainer})
    # two embedding shards per split: the external process reads each split's shard files
    return build_definitions(resources, n_shards=2).resolve_implicit_global_asset_job_def()


def _keys(*names: str) -> list[dg.AssetKey]:
    return [dg.AssetKey(n) for n in names]


@pytest.fixture(scope="module")
def fitted_inputs(tmp_path_factory):
    """embeddings of train and val_select (two shards each) and adapted_backbone, in process."""
    root = tmp_path_factory.mktemp("torchrun")
    job = _job(root)
    with dg.DagsterInstance.ephemeral() as instance:
        run_stage(job, instance, _keys("source_images", "split_assignment"), None, None)
        for split in ("train", "val_select"):
            run_stage(job, instance, _keys("split_manifest"), split, None)
            for shard in (0, 1):
                run_stage(job, instance, _keys("embeddings"), f"{shard}|{split}", None)
        run_stage(job, instance, _keys("adapted_backbone"), None, None)
        yield root, instance


def _checkpoint_run(root, instance, **trainer) -> dg.ExecuteInProcessResult:
    return _job(root, **trainer).execute_in_process(
        instance=instance, asset_selection=_keys("checkpoint"), raise_on_error=False)


def _messages(instance, run_id: str) -> list[str]:
    return [r.user_message for r in instance.all_logs(run_id) if r.user_message]


def test_torchrun_checkpoint_matches_in_process_training(fitted_inputs):
    root, instance = fitted_inputs
    in_process = _checkpoint_run(root, instance)
    assert in_process.success
    reference = load_checkpoint(root / "checkpoint" / "model.pt")

    result = _checkpoint_run(root, instance, launcher="torchrun", nproc_per_node=1)
    assert result.success
    (mat,) = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in mat.materialization.metadata.items()}
    # reported by the external process through Pipes, merged into the asset's metadata
    assert meta["launcher"] == "torchrun"
    assert meta["world_size"] == 1
    assert {"train_summary", "world_size", "launcher"} <= set(meta["pipes_reported"])
    assert meta["epochs_run"] == TRAINER["epochs"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["checkpoint_loadable"].passed
    assert checks["split_reads_allowed"].passed  # the asset still loaded its inputs
    assert meta["splits_read"] == ["train", "val_select"]

    # the Pipes log lines and the forwarded epoch rows are in the run's logs
    lines = _messages(instance, result.run_id)
    assert any("rank 0 of 1 (process group: gloo)" in m for m in lines), lines[-20:]
    assert sum(m.startswith("epoch=") for m in lines) == TRAINER["epochs"]

    # rank 0 wrote a checkpoint that loads and rebuilds; DDP over one rank with the
    # same seed is the in-process training: same epoch, same weights
    payload = load_checkpoint(root / "checkpoint" / "model.pt")
    model, cfg = model_from_checkpoint(payload)
    assert cfg.launcher == "torchrun" and payload["epoch"] == reference["epoch"]
    for name, tensor in reference["model_state_dict"].items():
        torch.testing.assert_close(payload["model_state_dict"][name], tensor,
                                   rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        z = model(torch.zeros(2, 3, TRAINER["img_size"], TRAINER["img_size"]))
    assert z.shape == (2, 2) and np.isfinite(z.numpy()).all()


def test_failed_torchrun_keeps_the_previous_checkpoint(fitted_inputs):
    root, instance = fitted_inputs
    path = root / "checkpoint" / "model.pt"
    if not path.exists():
        assert _checkpoint_run(root, instance).success
    before = path.read_bytes()
    result = _checkpoint_run(root, instance, launcher="torchrun", lr=1e9)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    # the step fails with the external process's own error (the trainer's BadInputError,
    # reported through Pipes), not only "External execution process failed with code 1"
    message = failure.step_failure_data.error.cause.message
    assert message.startswith("roadwork_assets.defs.training.torchrun_launch."
                              "ExternalTrainingFailed: torchrun training of checkpoint failed")
    assert "BadInputError: training diverged at epoch 1" in message
    assert "lower trainer.lr" in message
    assert path.read_bytes() == before


@pytest.mark.parametrize(("field", "value", "says"), [
    ("launcher", "mpirun", "'in_process' or 'torchrun'"),
    ("nproc_per_node", 0, "greater than or equal to 1"),
])
def test_bad_launcher_settings_are_refused_naming_the_field(field, value, says):
    from roadwork_assets.defs.settings import SettingsError, resolve_settings

    with pytest.raises(SettingsError) as err:
        resolve_settings({"resources": {"trainer": {"config": {field: value}}}}, environ={})
    assert f"resources.trainer.config.{field} = {value!r}" in str(err.value)
    assert says in str(err.value)
