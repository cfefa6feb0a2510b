"""A published bundle has the permissions of every other artifact (issue 8.5): folders
0777 & ~umask (0755 under the usual 022), files 0666 & ~umask (0644) -- not mkdtemp's 0700."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from roadwork_assets.contracts.schemas import Provenance
from roadwork_assets.core.artifacts import (
    ArtifactRegistry,
    atomic_write_json,
    file_sha256,
)
from roadwork_assets.core.calibration.policies import fit_policy
from roadwork_assets.core.export.bundle import build_bundle
from roadwork_assets.core.training.checkpoint import save_checkpoint
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import build_model


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_bundle_folder_and_files_have_the_modes_of_other_artifacts(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    reg = ArtifactRegistry(tmp_path)
    cfg = TrainerConfig(img_size=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(reg.checkpoint, model_state_dict=model.state_dict(), epoch=1,
                    best_metric=0.5, best_metric_name="val_select_nll",
                    config=cfg.model_dump(), backbone_name=cfg.backbone, mode=cfg.mode,
                    data_version="d" * 64, code_version="c",
                    assignment_version="a", weights_sha256="")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = np.stack([np.zeros(400), 3 * (2 * y - 1) + rng.normal(size=400)], 1)
    policy = fit_policy("softmax", np.repeat(z[:, None, :], 2, axis=1), y,
                        [f"i{i}" for i in range(400)], alpha=0.1, mode="three_way")
    fitted_on = Provenance(data_version="d" * 64, code_version="c", created_at="t",
                           checkpoint_sha256=file_sha256(reg.checkpoint))
    atomic_write_json(reg.policy("softmax"), policy.model_copy(update={"provenance": fitted_on}))

    directory, _, _ = build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                                   policy_path=reg.policy("softmax"), policy_asset="thresholds",
                                   export_onnx_model=False)

    assert _mode(directory) == 0o777 & ~umask == _mode(reg.bundles_dir)
    files = [p for p in directory.iterdir() if p.is_file()]
    assert files and {p.name: _mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}
    assert _mode(reg.checkpoint) == 0o666 & ~umask  # the same rule as the other artifacts


def test_latest_pointer_that_leaves_the_bundles_folder_is_refused(tmp_path):
    from roadwork_assets.contracts.errors import ArtifactIntegrityError
    from roadwork_assets.core.artifacts import ArtifactRegistry

    reg = ArtifactRegistry(tmp_path)
    reg.bundles_dir.mkdir(parents=True)
    reg.latest_bundle_pointer.write_text("../../etc\n")
    with pytest.raises(ArtifactIntegrityError, match="not a bundle id"):
        reg.latest_bundle()
