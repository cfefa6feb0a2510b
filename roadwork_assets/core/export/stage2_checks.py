"""Stage 2 of a cascade bundle: lineage at build and load, and its probe checks.

A cascade bundle carries ``stage2.json`` (a byte copy of the ``multiview_checkpoint``
artifact) and, with ONNX export, ``stage2.onnx`` (``MultiviewModel``: float images
[B, 3, S, S] in [0, 1] -> pooled logits [B, 2], dynamic batch). Lineage, checked when the
bundle is built and on every load:

- the policy's ``stage2_sha256`` is the sha256 of stage2.json (the policy was fitted on
  this stage 2's logits, so its one FNR guarantee covers this stage 2);
- stage2.json's ``checkpoint_sha256`` is model.pt's (stage 2 pools this network's views);
- a one-stage bundle carries no stage-2 file (``BundleManifest`` and ``check_closed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.multiview_schemas import (
    MultiviewCheckpoint,
    load_multiview_checkpoint,
)
from roadwork_assets.contracts.schemas import BUNDLE_LAYOUT, BundleManifest, BundleStage2
from roadwork_assets.core.artifacts import file_sha256, read_npz
from roadwork_assets.core.export.bundle_checks import (
    CHECKPOINT_FILE,
    POLICY_FILE,
    PROBE_FILE,
    REBUILD,
    refuse,
)
from roadwork_assets.core.export.cascade_serving import (
    is_cascade,
    onnx_stage2_logits,
    stage2_served,
    torch_stage2_logits,
)
from roadwork_assets.core.export.onnx_export import judge_served

STAGE2_FILE = BUNDLE_LAYOUT["stage2"]
STAGE2_ONNX_FILE = BUNDLE_LAYOUT["stage2_onnx"]
REFIT = ("re-materialize `multiview_checkpoint`, multiview_logits[val_calib] and "
         "`cascade_policy` before bundling")


def stage2_summary(stage2: MultiviewCheckpoint) -> BundleStage2:
    return BundleStage2(aggregator=stage2.aggregator, view_source=stage2.view_source,
                        views=list(stage2.views), crop_scale=stage2.crop_scale,
                        input_size=stage2.input_size)


def stage2_for_bundle(stage2_path: Path | None, policy: Any, checkpoint_sha256: str,
                      img_size: int) -> MultiviewCheckpoint:
    """The cascade's stage-2 artifact, refused (one line, the fix) unless it is the one
    the policy was fitted with and was itself fitted on this checkpoint."""
    if stage2_path is None:
        raise ArtifactIntegrityError(
            "policy 'cascade' needs its stage 2: pass stage2_path, the `multiview_checkpoint` "
            "artifact (multiview_checkpoint/aggregator.json) the cascade was fitted with; "
            "materialize `multiview_checkpoint` first")
    stage2_path = Path(stage2_path)
    stage2 = load_multiview_checkpoint(stage2_path)  # missing / invalid: one line, the fix
    sha = file_sha256(stage2_path)
    fitted_with = policy.stage2_sha256
    if fitted_with != sha:
        said = f"stage 2 {fitted_with[:12]}" if fitted_with else "no recorded stage 2"
        raise ArtifactIntegrityError(
            f"the cascade policy was fitted with {said} (stage2_sha256), but {stage2_path} "
            f"(`multiview_checkpoint`) is {sha[:12]}: {REFIT} (the cascade's guarantee holds "
            "only for the stage 2 it was fitted with)")
    if stage2.checkpoint_sha256 != checkpoint_sha256:
        raise ArtifactIntegrityError(
            f"{stage2_path} (`multiview_checkpoint`) was fitted on the logits of checkpoint "
            f"{stage2.checkpoint_sha256[:12]}, but the checkpoint is {checkpoint_sha256[:12]}: "
            f"{REFIT}")
    if stage2.input_size != img_size:
        raise ArtifactIntegrityError(
            f"{stage2_path} (`multiview_checkpoint`) resizes views to {stage2.input_size} px, "
            f"the checkpoint takes {img_size} px: {REFIT}")
    return stage2


def check_stage2_lineage(directory: Path, manifest: BundleManifest,
                         policy: Any) -> MultiviewCheckpoint | None:
    """stage2.json of a cascade bundle, after its lineage checks (None for one stage)."""
    if not is_cascade(policy):
        return None  # the manifest schema and check_closed refuse stage-2 files here
    try:
        stage2 = load_multiview_checkpoint(directory / STAGE2_FILE)
    except ArtifactIntegrityError as exc:
        raise refuse(directory, f"{STAGE2_FILE} is refused ({str(exc).splitlines()[0]}); "
                     f"{REBUILD}") from exc
    sha = manifest.files["stage2"].sha256  # == stage2.json's sha256 (checked)
    if policy.stage2_sha256 != sha:
        said = (f"stage 2 {policy.stage2_sha256[:12]}" if policy.stage2_sha256
                else "no recorded stage 2")
        raise refuse(directory, f"{POLICY_FILE} was fitted with {said}, but {STAGE2_FILE} "
                     f"is {sha[:12]}: the cascade's FNR guarantee does not hold for this "
                     f"stage 2; {REBUILD} from the multiview_checkpoint the cascade was "
                     "fitted with")
    model_sha = manifest.files["checkpoint"].sha256
    if stage2.checkpoint_sha256 != model_sha:
        raise refuse(directory, f"{STAGE2_FILE} was fitted on the logits of checkpoint "
                     f"{stage2.checkpoint_sha256[:12]}, but {CHECKPOINT_FILE} is "
                     f"{model_sha[:12]}: stage 2 belongs to another model; {REBUILD} from a "
                     "multiview_checkpoint fitted on this checkpoint")
    if manifest.stage2 != stage2_summary(stage2) or stage2.input_size != manifest.img_size:
        raise refuse(directory, f"manifest.json describes stage 2 as {manifest.stage2} but "
                     f"{STAGE2_FILE} holds {stage2_summary(stage2)} (input {stage2.input_size} "
                     f"px, model {manifest.img_size} px); {REBUILD}")
    return stage2


def check_stage2_probe(directory: Path, manifest: BundleManifest, policy: Any,
                       stage2_model: Any, check_onnx: bool) -> bool:
    """torch stage 2 reproduces the stage-2 logits stored in probe.npz and stage2.onnx
    serves what torch does, on EVERY probe image (routed or not), judged on stage 2's
    served probability and decision. True if ONNX was checked."""
    probe = read_npz(directory / PROBE_FILE)  # readable and shaped: check_probe ran first
    images, stored = probe["images"], probe["stage2_logits"].astype(np.float64)
    z_torch, tol = torch_stage2_logits(stage2_model, images)
    again = judge_served(policy, z_torch[:, None], stored[:, None], tol[:, None],
                         serve=stage2_served)
    if not again.passed:
        raise refuse(directory, f"{STAGE2_FILE} with {CHECKPOINT_FILE} no longer serves the "
                     f"stage-2 outputs stored in {PROBE_FILE}: {again.summary()}; {REBUILD}")
    if "stage2_onnx" not in manifest.files or not check_onnx:
        return False
    try:
        z_onnx = onnx_stage2_logits(directory / STAGE2_ONNX_FILE, images)
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise refuse(directory, f"{STAGE2_ONNX_FILE} does not run on the probe batch "
                     f"({first}); {REBUILD}") from exc
    report = judge_served(policy, z_torch[:, None], z_onnx[:, None], tol[:, None],
                          serve=stage2_served)
    if not report.passed:
        raise refuse(directory, f"{STAGE2_ONNX_FILE} does not serve what stage 2 in torch "
                     f"serves on the probe batch in {PROBE_FILE}: {report.summary()}; "
                     f"{REBUILD}")
    return True
