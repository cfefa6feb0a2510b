"""The deployable bundle: checkpoint + exactly one exit policy + ONNX + hashed manifest.

Layout of ``bundles/<bundle_id>/``::

    manifest.json   BundleManifest: every file's sha256 and size, provenance
    model.pt        the checkpoint (weights_only loadable)
    policy.json     the ONE exit policy (softmax | gate | scrc)
    model.onnx      optional: the network, fixed spatial size, dynamic batch

A bundle is written in a staging directory and renamed into place, and ``LATEST``
is then switched atomically, so a crash never leaves a half bundle behind the pointer.
Loading verifies the manifest schema, every hash, and that exactly one policy exists.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roadwork_assets.contracts.errors import ArtifactIntegrityError, InsufficientDataError
from roadwork_assets.contracts.policy_schemas import (
    PolicyParams,
    UnfittedPolicy,
    parse_policy,
    parse_policy_artifact,
)
from roadwork_assets.contracts.schemas import (
    BundleFile,
    BundleManifest,
    Provenance,
    load_json_artifact,
)
from roadwork_assets.core.artifacts import (
    atomic_write_json,
    combine_versions,
    make_provenance,
    atomic_write_text,
    file_sha256,
    publish_directory,
    remove_tree_quietly,
)
from roadwork_assets.core.training.checkpoint import load_checkpoint

MANIFEST = "manifest.json"
POLICY_FILE = "policy.json"
CHECKPOINT_FILE = "model.pt"
ONNX_FILE = "model.onnx"


@dataclass
class Bundle:
    directory: Path
    manifest: BundleManifest
    policy: PolicyParams
    checkpoint: dict[str, Any]


def _describe(directory: Path, name: str) -> BundleFile:
    path = directory / name
    return BundleFile(path=name, sha256=file_sha256(path), size_bytes=path.stat().st_size)


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
    of exactly this checkpoint. Returns {"data_version", "checkpoint_sha256"}.
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
    if fitted_on.checkpoint_sha256 not in (None, checkpoint_sha):
        raise ArtifactIntegrityError(
            f"{policy_path.name} was fitted on the logits of checkpoint "
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
) -> tuple[Path, BundleManifest, dict[str, Any]]:
    """Check lineage, assemble, hash and publish a bundle under its content id; returns
    (dir, manifest, extra numbers). ``LATEST`` is switched separately (``set_latest``),
    after the caller's checks pass."""
    payload = load_checkpoint(checkpoint_path)
    lineage = bundle_lineage(checkpoint_path, policy_path, policy_asset, payload=payload)
    provenance = make_provenance(lineage["data_version"], lineage["checkpoint_sha256"])
    policy = parse_policy(json.loads(Path(policy_path).read_text()))
    bundles_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=bundles_dir))
    extra: dict[str, Any] = {}
    try:
        shutil.copyfile(checkpoint_path, staging / CHECKPOINT_FILE)
        atomic_write_json(staging / POLICY_FILE, policy)
        files = {"checkpoint": CHECKPOINT_FILE, "policy": POLICY_FILE}
        img_size = int(payload.get("img_size", payload["config"]["img_size"]))
        if export_onnx_model:
            from roadwork_assets.core.export.onnx_export import export_onnx, onnx_parity
            from roadwork_assets.core.training.pipeline import model_from_checkpoint

            model, _ = model_from_checkpoint(payload)
            export_onnx(model, img_size, staging / ONNX_FILE)
            # judged on what is served: this policy's probability and decision
            parity = onnx_parity(model, staging / ONNX_FILE, img_size, policy,
                                 n_views=int(payload["config"]["n_views"]))
            extra.update(parity.metadata())
            extra["onnx_parity"] = parity  # a ParityReport: `.passed`, `.summary()`
            files["onnx"] = ONNX_FILE
        described = {role: _describe(staging, name) for role, name in files.items()}
        bundle_id = hashlib.sha256(
            "".join(f"{r}:{f.sha256}" for r, f in sorted(described.items())).encode()
        ).hexdigest()[:16]
        manifest = BundleManifest(
            bundle_id=bundle_id,
            policy_kind=policy.kind,
            files=described,
            backbone_name=payload["backbone_name"],
            mode=payload["mode"],
            img_size=img_size,
            n_views=int(payload["config"]["n_views"]),
            provenance=provenance,
        )
        atomic_write_json(staging / MANIFEST, manifest)
        dest = bundles_dir / bundle_id
        if dest.exists():  # identical content already published: keep the old copy
            try:
                verify_bundle(dest)
            except ArtifactIntegrityError as exc:
                raise ArtifactIntegrityError(
                    f"{exc}. The published bundle {dest} with the same content id is damaged: "
                    "delete that folder and materialize `bundle` again"
                ) from exc
            remove_tree_quietly(staging)
        else:
            publish_directory(staging, dest)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    return dest, manifest, extra


def verify_bundle(directory: Path) -> BundleManifest:
    """Schema, exactly one policy, every named file present with its sha256."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactIntegrityError(f"bundle directory {directory} does not exist")
    manifest = load_json_artifact(directory / MANIFEST, BundleManifest, "bundle manifest")
    policy_roles = [r for r in manifest.files if r.startswith("policy")]
    policy_files = sorted(p.name for p in directory.glob("*.json") if p.name != MANIFEST)
    if len(policy_roles) != 1 or len(policy_files) != 1:
        raise ArtifactIntegrityError(
            f"bundle {directory} must hold exactly one exit policy; manifest names "
            f"{policy_roles or 'none'} and the folder has {policy_files or 'none'}. "
            "Rebuild it with the `bundle` asset (bundle_policy picks the one policy)."
        )
    for role in ("checkpoint", "policy"):
        if role not in manifest.files:
            raise ArtifactIntegrityError(f"bundle {directory}: manifest names no {role} file")
    problems = []
    for role, entry in manifest.files.items():
        path = directory / entry.path
        if not path.is_file():
            problems.append(f"{role}: {entry.path} is missing")
        elif file_sha256(path) != entry.sha256:
            problems.append(f"{role}: {entry.path} sha256 differs from the manifest (tampered "
                            "or corrupted)")
    if problems:
        raise ArtifactIntegrityError(f"bundle {directory} failed verification: "
                                     + "; ".join(problems))
    return manifest


def load_bundle(directory: Path) -> Bundle:
    manifest = verify_bundle(directory)
    policy = parse_policy(json.loads((directory / manifest.files["policy"].path).read_text()))
    if policy.kind != manifest.policy_kind:
        raise ArtifactIntegrityError(
            f"bundle {directory}: manifest says policy {manifest.policy_kind!r}, "
            f"policy.json holds {policy.kind!r}"
        )
    checkpoint = load_checkpoint(directory / manifest.files["checkpoint"].path)
    return Bundle(directory=Path(directory), manifest=manifest, policy=policy,
                  checkpoint=checkpoint)
