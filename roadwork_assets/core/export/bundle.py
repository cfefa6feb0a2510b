"""The deployable bundle: checkpoint + exactly one exit policy + ONNX + hashed manifest.

Layout of ``bundles/<bundle_id>/`` (flat and fixed: ``contracts.schemas.BUNDLE_LAYOUT``)::

    manifest.json   BundleManifest: every file's sha256 and size, provenance
    model.pt        the checkpoint (weights_only loadable)
    policy.json     the ONE exit policy (softmax | gate | scrc | cascade)
    probe.npz       a fixed uint8 probe batch and the served outputs torch gave on it
                    (a cascade: also stage 2's pooled logits of every probe image, and
                    the stage that served each)
    model.onnx      optional: the network, fixed spatial size, dynamic batch
    stage2.json     cascade only: stage 2, a copy of the `multiview_checkpoint` artifact
    stage2.onnx     cascade only, with model.onnx: stage 2 as one network (views +
                    stage-1 network + aggregator), images [B, 3, S, S] -> logits [B, 2]

A bundle is written in a staging directory and renamed into place, and ``LATEST``
is then switched atomically, so a crash never leaves a half bundle behind the pointer.

A bundle is closed, and loading checks it again (``load_bundle``), not only the build:
every manifest entry is a plain file name in the folder, the folder holds exactly the
listed files (no symlinks, nothing unlisted), every hash and size matches, the
bundle id is the content's, the policy and the provenance name this checkpoint, the
manifest's img_size / n_views / backbone are the checkpoint's, torch reproduces the
stored probe outputs and ONNX Runtime matches torch on the probe (``onnx_parity``'s
tolerance). A cascade bundle's stage 2 is checked the same way (``stage2_checks``): the
policy was fitted with this stage2.json, stage2.json with this model.pt, and torch and
stage2.onnx reproduce the stored stage-2 logits of every probe image, routed or not.
The manifest is unsigned: it proves internal consistency and lineage,
not who made the bundle (see the README).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import (
    ArtifactIntegrityError,
    InsufficientDataError,
)
from roadwork_assets.contracts.policy_schemas import (
    PolicyParams,
    UnfittedPolicy,
    parse_policy,
    parse_policy_artifact,
)
from roadwork_assets.contracts.schemas import (
    BundleManifest,
    Provenance,
)
from roadwork_assets.core.artifacts import (
    _UMASK,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    combine_versions,
    file_sha256,
    make_provenance,
    publish_directory,
    remove_tree_quietly,
)
from roadwork_assets.core.export.bundle_checks import (
    CHECKPOINT_FILE,
    MANIFEST,
    ONNX_FILE,
    POLICY_FILE,
    PROBE_FILE,
    check_closed,
    check_hashes,
    check_lineage,
    check_probe,
    content_id,
    describe_file,
    read_manifest,
    read_policy,
    rebuild_model,
    refuse,
)
from roadwork_assets.core.export.cascade_serving import (
    CascadeParity,
    is_cascade,
    onnx_stage2_logits,
    served_outputs,
    stage1_served,
    stage2_served,
    torch_stage2_logits,
)
from roadwork_assets.core.export.stage2_checks import (
    STAGE2_FILE,
    STAGE2_ONNX_FILE,
    check_stage2_lineage,
    check_stage2_probe,
    stage2_for_bundle,
    stage2_summary,
)
from roadwork_assets.core.training.checkpoint import load_checkpoint

PROBE_IMAGES = 8


@dataclass
class Bundle:
    directory: Path
    manifest: BundleManifest
    policy: PolicyParams
    checkpoint: dict[str, Any]
    model: Any = None  # the RoadworkClassifier rebuilt from the checkpoint (eval mode)
    onnx_checked: bool = False  # ONNX Runtime was compared with torch on the probe
    # cascade bundles only: stage 2's artifact (stage2.json) and network over `model`
    stage2: Any = None  # contracts.multiview_schemas.MultiviewCheckpoint
    stage2_model: Any = None  # core.models.multiview.MultiviewModel (eval mode)


def _fitted_policy(policy_path: Path, policy_asset: str) -> PolicyParams:
    """The configured policy, or a one-line refusal if its asset recorded `fitted: false`."""
    policy = parse_policy_artifact(json.loads(Path(policy_path).read_text()))
    if isinstance(policy, UnfittedPolicy):
        reason = " ".join(policy.reason.split())
        raise InsufficientDataError(
            f"cannot bundle policy {policy.kind!r}: `{policy_asset}` could not be fitted: {reason.rstrip('.')}. "
            "Set exit_policy.bundle_policy to a policy that was fitted, or add calibration data "
            f"and re-materialize `{policy_asset}`."
        )
    return policy


def bundle_lineage(checkpoint_path: Path, policy_path: Path, policy_asset: str,
                   payload: dict[str, Any] | None = None) -> dict[str, str]:
    """The checkpoint and policy must belong together: the policy was fitted on the logits
    of exactly this checkpoint, and says so. Returns {"data_version", "checkpoint_sha256"}.
    ``payload``: the checkpoint already loaded, to avoid reading it twice."""
    if not Path(policy_path).exists():
        raise ArtifactIntegrityError(
            f"policy file {policy_path} does not exist: materialize `{policy_asset}` or set "
            "exit_policy.bundle_policy to a policy that was materialized"
        )
    payload = payload if payload is not None else load_checkpoint(checkpoint_path)
    checkpoint_sha = file_sha256(checkpoint_path)
    fitted_on = (_fitted_policy(policy_path, policy_asset).provenance
                 or Provenance(data_version="unknown", code_version="", created_at=""))
    if fitted_on.checkpoint_sha256 is None:
        # a bundle re-checks this lineage on every load, so it must be recorded
        raise ArtifactIntegrityError(
            f"{Path(policy_path).name} records no checkpoint it was fitted on "
            "(provenance.checkpoint_sha256): re-materialize logits[val_calib] and "
            f"`{policy_asset}` before bundling"
        )
    if fitted_on.checkpoint_sha256 != checkpoint_sha:
        raise ArtifactIntegrityError(
            f"{Path(policy_path).name} was fitted on the logits of checkpoint "
            f"{fitted_on.checkpoint_sha256[:12]}, but the checkpoint is now {checkpoint_sha[:12]}: "
            f"re-materialize logits[val_calib] and `{policy_asset}` before bundling (a policy's "
            "guarantee holds only for the model it was fitted on)"
        )
    data_version = combine_versions({"checkpoint": payload["data_version"],
                                     "policy": fitted_on.data_version})
    return {"data_version": data_version, "checkpoint_sha256": checkpoint_sha}


def set_latest(latest_pointer: Path, bundle_id: str) -> None:
    atomic_write_text(latest_pointer, bundle_id + "\n")


def build_bundle(
    bundles_dir: Path,
    *,
    checkpoint_path: Path,
    policy_path: Path,
    policy_asset: str = "the policy asset",
    export_onnx_model: bool = True,
    stage2_path: Path | None = None,
) -> tuple[Path, BundleManifest, dict[str, Any]]:
    """Check lineage, assemble, hash and publish a bundle under its content id; returns
    (dir, manifest, extra numbers). ``LATEST`` is switched separately (``set_latest``),
    after the caller's checks pass. ``stage2_path``: the `multiview_checkpoint` artifact
    (``aggregator.json``), required when the policy is a cascade (ignored otherwise: a
    one-stage bundle carries no stage-2 file)."""
    from roadwork_assets.core.training.multiview import stage2_model
    from roadwork_assets.core.training.pipeline import model_from_checkpoint

    payload = load_checkpoint(checkpoint_path)
    lineage = bundle_lineage(checkpoint_path, policy_path, policy_asset, payload=payload)
    provenance = make_provenance(lineage["data_version"], lineage["checkpoint_sha256"])
    policy = parse_policy(json.loads(Path(policy_path).read_text()))
    img_size = int(payload.get("img_size", payload["config"]["img_size"]))
    n_views = int(payload["config"]["n_views"])
    stage2 = (stage2_for_bundle(stage2_path, policy, lineage["checkpoint_sha256"], img_size)
              if is_cascade(policy) else None)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets the next run collect this folder if this process dies
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=bundles_dir))
    staging.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; a bundle is read like any artifact
    extra: dict[str, Any] = {}
    try:
        shutil.copyfile(checkpoint_path, staging / CHECKPOINT_FILE)
        atomic_write_json(staging / POLICY_FILE, policy)
        files = {"checkpoint": CHECKPOINT_FILE, "policy": POLICY_FILE, "probe": PROBE_FILE}
        model, _ = model_from_checkpoint(payload)
        stages = _Stages(policy, model, n_views, img_size)
        if stage2 is not None:
            shutil.copyfile(stage2_path, staging / STAGE2_FILE)  # bytes: policy.stage2_sha256
            files["stage2"] = STAGE2_FILE
            stages.stage2_model = stage2_model(model, stage2)
        stages.write_probe(staging / PROBE_FILE)
        if export_onnx_model:
            extra = stages.export_onnx_and_judge(staging)
            files.update(onnx=ONNX_FILE, **({"stage2_onnx": STAGE2_ONNX_FILE} if stage2 else {}))
        described = {role: describe_file(staging, name) for role, name in files.items()}
        bundle_id = content_id(described)
        manifest = BundleManifest(
            bundle_id=bundle_id,
            policy_kind=policy.kind,
            files=described,
            backbone_name=payload["backbone_name"],
            mode=payload["mode"],
            adapter=payload.get("adapter"),
            img_size=img_size,
            n_views=n_views,
            stages=2 if stage2 is not None else 1,
            stage2=stage2_summary(stage2) if stage2 is not None else None,
            provenance=provenance,
        )
        atomic_write_json(staging / MANIFEST, manifest)
        dest = _publish_once(staging, bundles_dir / bundle_id)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    return dest, manifest, extra


@dataclass
class _Stages:
    """The served network(s) of a bundle being built, and what they serve on the probe."""

    policy: PolicyParams
    model: Any
    n_views: int
    img_size: int
    stage2_model: Any = None
    probe: Any = None

    def write_probe(self, path: Path) -> None:
        """The probe batch and what torch serves on it travel with the bundle, so every
        load can check that model.pt (and stage 2, and the ONNX files) still serve that.
        A cascade's stage-2 logits are stored for EVERY probe image, routed or not."""
        from roadwork_assets.core.export.onnx_export import probe_images_uint8, torch_probe_logits

        self.probe = probe_images_uint8(PROBE_IMAGES, self.img_size)
        self.z1, self.tol1 = torch_probe_logits(self.model, self.probe, self.n_views)
        arrays: dict[str, np.ndarray] = {}
        z2 = None
        if self.stage2_model is not None:
            z2, self.tol2 = torch_stage2_logits(self.stage2_model, self.probe)
            self.z2 = z2.astype(np.float32)
            z2 = self.z2.astype(np.float64)  # what load re-derives the served outputs from
        z1 = self.z1.astype(np.float32).astype(np.float64)  # as stored, as load re-derives
        decision, prob, stage = served_outputs(self.policy, z1, z2)
        if z2 is not None:
            arrays.update(stage2_logits=self.z2, stage=stage)
        atomic_write_npz(path, images=self.probe, logits=self.z1.astype(np.float32),
                         probability=prob.astype(np.float64), decision=decision.astype(np.int8),
                         **arrays)

    def export_onnx_and_judge(self, staging: Path) -> dict[str, Any]:
        """Export model.onnx (and stage2.onnx) into the staging folder and judge them on
        what is served, ORT against torch on the probe batch: the policy's probability
        and decision (a cascade: each stage's, ``cascade_serving``)."""
        from roadwork_assets.core.export.onnx_export import (
            export_onnx,
            judge_served,
            onnx_probe_logits,
        )

        export_onnx(self.model, self.img_size, staging / ONNX_FILE)
        z_onnx = onnx_probe_logits(staging / ONNX_FILE, self.probe, self.n_views)
        parity: Any = judge_served(self.policy, self.z1, z_onnx, self.tol1, serve=stage1_served)
        if self.stage2_model is not None:
            export_onnx(self.stage2_model, self.img_size, staging / STAGE2_ONNX_FILE)
            z2_onnx = onnx_stage2_logits(staging / STAGE2_ONNX_FILE, self.probe)
            parity = CascadeParity(parity, judge_served(
                self.policy, self.z2[:, None], z2_onnx[:, None], self.tol2[:, None],
                serve=stage2_served))
        return {**parity.metadata(), "onnx_parity": parity}  # .passed, .summary()


def _publish_once(staging: Path, dest: Path) -> Path:
    """Rename the staged bundle to its content id; identical content already published
    keeps the old copy (verified, so a damaged one is named instead of trusted)."""
    if not dest.exists():
        publish_directory(staging, dest)
        return dest
    try:
        verify_bundle(dest)
    except ArtifactIntegrityError as exc:
        raise ArtifactIntegrityError(
            f"{exc}. The published bundle {dest} with the same content id is damaged: "
            "delete that folder and materialize `bundle` again"
        ) from exc
    remove_tree_quietly(staging)
    return dest


def load_bundle(directory: Path, *, check_onnx: bool = True) -> Bundle:
    """Load a bundle, checking that it is closed and consistent (see the module
    docstring). ``check_onnx=False`` skips running ONNX Runtime on the probe batch (the
    one check that needs onnxruntime); everything else is always checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactIntegrityError(f"bundle directory {directory} does not exist")
    manifest = read_manifest(directory)
    check_closed(directory, manifest)
    check_hashes(directory, manifest)
    policy = read_policy(directory, manifest)
    try:
        checkpoint = load_checkpoint(directory / CHECKPOINT_FILE)
    except ArtifactIntegrityError as exc:
        raise refuse(directory, str(exc).splitlines()[0]) from exc
    check_lineage(directory, manifest, policy, checkpoint)
    stage2 = check_stage2_lineage(directory, manifest, policy)
    model = rebuild_model(directory, manifest, checkpoint)
    mv = None
    if stage2 is not None:
        from roadwork_assets.core.training.multiview import stage2_model

        mv = stage2_model(model, stage2)
    if manifest.precision != "fp32":  # INT8: ORT serves, the probe holds ORT's outputs
        from roadwork_assets.core.export.int8_bundle import check_int8_probe

        checked = check_int8_probe(directory, manifest, policy, model, mv, check_onnx)
    else:
        checked = check_probe(directory, manifest, policy, model, check_onnx)
        if mv is not None:
            checked = check_stage2_probe(directory, manifest, policy, mv, check_onnx) and checked
    return Bundle(directory=directory, manifest=manifest, policy=policy,
                  checkpoint=checkpoint, model=model, onnx_checked=checked,
                  stage2=stage2, stage2_model=mv)


def verify_bundle(directory: Path, *, check_onnx: bool = True) -> BundleManifest:
    """Every load-time check of ``load_bundle``; returns the manifest."""
    return load_bundle(directory, check_onnx=check_onnx).manifest
