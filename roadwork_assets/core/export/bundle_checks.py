"""Load-time checks of a closed bundle (``load_bundle`` runs them in this order).

Each raises ``ArtifactIntegrityError`` with one line: the bundle, the file, the
mismatch, and what to do (rebuild). The build writes what these read; the layout and
the bounds are in ``contracts.schemas`` (``BUNDLE_LAYOUT``, ``BundleManifest``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.policy_schemas import PolicyParams, parse_policy
from roadwork_assets.contracts.schemas import BUNDLE_LAYOUT, BundleFile, BundleManifest
from roadwork_assets.core.artifacts import file_sha256, read_npz
from roadwork_assets.core.export.cascade_serving import is_cascade, served_outputs, stage1_served
from roadwork_assets.core.export.onnx_export import (
    judge_served,
    onnx_probe_logits,
    torch_probe_logits,
)

MANIFEST = "manifest.json"
POLICY_FILE = BUNDLE_LAYOUT["policy"]
CHECKPOINT_FILE = BUNDLE_LAYOUT["checkpoint"]
ONNX_FILE = BUNDLE_LAYOUT["onnx"]
PROBE_FILE = BUNDLE_LAYOUT["probe"]
REBUILD = "rebuild the bundle (materialize `bundle`, or `roadwork run`)"


def content_id(files: dict[str, BundleFile]) -> str:
    """The bundle id: a hash of its files' roles and hashes."""
    return hashlib.sha256(
        "".join(f"{r}:{f.sha256}" for r, f in sorted(files.items())).encode()
    ).hexdigest()[:16]



def refuse(directory: Path, what: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(f"bundle {directory}: {' '.join(str(what).split())}")


def validation_line(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def read_manifest(directory: Path) -> BundleManifest:
    """manifest.json, validated (schema 2: plain names, fixed layout, bounds); one line
    on any problem. Version-1 manifests (open bundles, no probe) are refused: rebuild."""
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise refuse(directory, f"{MANIFEST} is missing or not a regular file: not a bundle, "
                      f"or a damaged one; {REBUILD}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refuse(directory, f"{MANIFEST} is not valid JSON ({exc}); {REBUILD}") from exc
    if not isinstance(raw, dict):
        raise refuse(directory, f"{MANIFEST} is not a JSON object; {REBUILD}")
    version = raw.get("schema_version")
    if version == 1:
        raise refuse(directory, f"{MANIFEST} has schema_version 1, from before bundles were "
                      "closed (no stored probe batch, no path rules), so it cannot be checked "
                      f"on load; {REBUILD}")
    if version != 2:
        raise refuse(directory, f"{MANIFEST} has schema_version {version!r}; this code reads "
                      f"[2]: {REBUILD} with this version of roadwork_assets, or upgrade")
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as exc:
        raise refuse(directory, f"{MANIFEST} is refused: {validation_line(exc)}; "
                      f"{REBUILD}") from exc


def check_closed(directory: Path, manifest: BundleManifest) -> None:
    """The folder holds exactly manifest.json and the listed files, all regular files."""
    listed = {f.path for f in manifest.files.values()}
    odd, unlisted = [], []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                odd.append(f"{entry.name} is a symlink (to {os.readlink(entry.path)})")
            elif not entry.is_file(follow_symlinks=False):
                odd.append(f"{entry.name} is not a regular file")
            elif entry.name != MANIFEST and entry.name not in listed:
                unlisted.append(entry.name)
    if odd:
        raise refuse(directory, "; ".join(odd) + ": a bundle holds regular files only; "
                      + REBUILD)
    stage2 = [n for n in unlisted if n in (BUNDLE_LAYOUT["stage2"], BUNDLE_LAYOUT["stage2_onnx"])]
    if stage2:
        raise refuse(directory, f"{stage2} not listed in {MANIFEST}: only a cascade bundle "
                      "carries stage-2 files, and lists them; remove them, or " + REBUILD)
    extra_json = [n for n in unlisted if n.endswith(".json")]
    if extra_json:
        raise refuse(directory, f"must hold exactly one exit policy; the manifest names "
                      f"{POLICY_FILE} and the folder also has {extra_json}. Remove them, or "
                      "rebuild it with the `bundle` asset (bundle_policy picks the one policy)")
    if unlisted:
        raise refuse(directory, f"{unlisted} not listed in {MANIFEST}: a bundle is closed; "
                      f"remove them, or {REBUILD}")


def check_hashes(directory: Path, manifest: BundleManifest) -> None:
    problems = []
    for role, entry in manifest.files.items():
        path = directory / entry.path
        if not path.is_file():
            problems.append(f"{role}: {entry.path} is missing")
        elif path.stat().st_size != entry.size_bytes:  # no need to hash it
            problems.append(f"{role}: {entry.path} sha256 differs from the manifest (tampered "
                            f"or corrupted: {path.stat().st_size} bytes, the manifest says "
                            f"{entry.size_bytes})")
        elif file_sha256(path) != entry.sha256:
            problems.append(f"{role}: {entry.path} sha256 differs from the manifest (tampered "
                            "or corrupted)")
    if problems:
        raise refuse(directory, "failed verification: " + "; ".join(problems))
    if content_id(manifest.files) != manifest.bundle_id:
        raise refuse(directory, f"{MANIFEST}: bundle_id {manifest.bundle_id} is not the id of "
                      f"its files ({content_id(manifest.files)}): the manifest was edited; "
                      + REBUILD)


def read_policy(directory: Path, manifest: BundleManifest) -> PolicyParams:
    try:
        policy = parse_policy(json.loads((directory / POLICY_FILE).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refuse(directory, f"{POLICY_FILE} is not valid JSON ({exc}); {REBUILD}") from exc
    except ArtifactIntegrityError as exc:
        raise refuse(directory, f"{POLICY_FILE}: {exc}") from exc
    if policy.kind != manifest.policy_kind:
        raise refuse(directory, f"{MANIFEST} says policy {manifest.policy_kind!r}, "
                      f"{POLICY_FILE} holds {policy.kind!r}; {REBUILD}")
    return policy


def check_lineage(directory: Path, manifest: BundleManifest, policy: PolicyParams,
                   checkpoint: dict[str, Any]) -> None:
    """The policy and the provenance name this checkpoint; the manifest's model
    description is the checkpoint's own."""
    sha = manifest.files["checkpoint"].sha256  # == model.pt's sha256 (checked)
    recorded = manifest.provenance.checkpoint_sha256 or ""
    if recorded != sha:
        raise refuse(directory, f"{CHECKPOINT_FILE} has sha256 {sha[:12]} but the manifest's "
                      f"provenance.checkpoint_sha256 is {recorded[:12]}: the checkpoint was "
                      f"swapped after the bundle was built; {REBUILD}")
    fitted_on = policy.provenance.checkpoint_sha256 if policy.provenance else None
    if fitted_on != sha:
        said = f"checkpoint {fitted_on[:12]}" if fitted_on else "no recorded checkpoint"
        raise refuse(directory, f"{POLICY_FILE} was fitted on the logits of {said}, but "
                      f"{CHECKPOINT_FILE} is {sha[:12]}: its FNR guarantee does not hold for "
                      f"this model; {REBUILD} from a policy fitted on this checkpoint")
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    for field, have in (("backbone_name", checkpoint.get("backbone_name")),
                        ("mode", checkpoint.get("mode")),
                        ("img_size", checkpoint.get("img_size", config.get("img_size"))),
                        ("n_views", config.get("n_views"))):
        said = getattr(manifest, field)
        if have != said:
            raise refuse(directory, f"{MANIFEST} says {field} {said!r} but {CHECKPOINT_FILE} "
                          f"was built with {have!r}; {REBUILD}")


def rebuild_model(directory: Path, manifest: BundleManifest, checkpoint: dict[str, Any]):
    from roadwork_assets.core.training.pipeline import model_from_checkpoint

    try:
        model, _ = model_from_checkpoint(checkpoint)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise refuse(directory, f"{CHECKPOINT_FILE} does not rebuild into its model "
                      f"({first}); {REBUILD}") from exc
    patch = getattr(getattr(model.backbone, "patch_embed", None), "patch_size", None)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else 1
    if manifest.img_size % patch:
        raise refuse(directory, f"img_size {manifest.img_size} is not a multiple of the "
                      f"backbone's patch size {patch}; {REBUILD} at a multiple of {patch}")
    return model


def _probe_arrays(directory: Path, manifest: BundleManifest,
                  policy: PolicyParams) -> dict[str, np.ndarray]:
    """probe.npz, its arrays present and shaped for this manifest (a cascade's too)."""
    try:
        probe = read_npz(directory / PROBE_FILE)
    except (ValueError, OSError, ArtifactIntegrityError) as exc:
        raise refuse(directory, f"{PROBE_FILE} is unreadable ({exc}); {REBUILD}") from exc
    s, v = manifest.img_size, manifest.n_views
    shapes = {"images": (np.uint8, 4), "logits": (np.floating, 3),
              "probability": (np.floating, 1), "decision": (np.integer, 1)}
    if is_cascade(policy):
        shapes.update(stage2_logits=(np.floating, 2), stage=(np.integer, 1))
    for key, (kind, ndim) in shapes.items():
        arr = probe.get(key)
        if arr is None or not np.issubdtype(arr.dtype, kind) or arr.ndim != ndim:
            raise refuse(directory, f"{PROBE_FILE} lacks a valid {key!r} array; {REBUILD}")
    images, stored = probe["images"], probe["logits"]
    n = len(images)
    wanted = {"probability": (n,), "decision": (n,), "stage2_logits": (n, 2), "stage": (n,)}
    if (images.shape[1:] != (3, s, s) or stored.shape != (n, v, 2) or n < 1
            or any(probe[k].shape != shape for k, shape in wanted.items() if k in shapes)):
        raise refuse(directory, f"{PROBE_FILE} holds images {images.shape} and logits "
                      f"{stored.shape}, not [N, 3, {s}, {s}] and [N, {v}, 2] (and one served "
                      f"output per image); {REBUILD}")
    return probe


def check_probe(directory: Path, manifest: BundleManifest, policy: PolicyParams, model: Any,
                 check_onnx: bool) -> bool:
    """torch reproduces the served outputs stored in probe.npz, and ONNX Runtime serves
    what torch does, within ``onnx_parity``'s fp32 tolerance. True if ONNX was checked.
    A cascade's stage 1 is judged on what it serves (p1 and its exit); its stage 2 in
    ``stage2_checks.check_stage2_probe``."""
    images, stored, _ = stored_probe(directory, manifest, policy, REBUILD)
    v = manifest.n_views
    z_torch, tol = torch_probe_logits(model, images, v)
    again = judge_served(policy, z_torch, stored, tol, serve=stage1_served)
    if not again.passed:
        raise refuse(directory, f"{CHECKPOINT_FILE} no longer serves the outputs stored in "
                      f"{PROBE_FILE}: {again.summary()}; the checkpoint or the probe was "
                      f"replaced; {REBUILD}")
    if "onnx" not in manifest.files or not check_onnx:
        return False
    try:
        z_onnx = onnx_probe_logits(directory / ONNX_FILE, images, v)
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise refuse(directory, f"{ONNX_FILE} does not run on the probe batch "
                      f"[N, 3, {manifest.img_size}, {manifest.img_size}] ({first}); "
                      f"{REBUILD}") from exc
    report = judge_served(policy, z_torch, z_onnx, tol, serve=stage1_served)
    if not report.passed:
        raise refuse(directory, f"{ONNX_FILE} does not serve what {CHECKPOINT_FILE} serves on "
                      f"the probe batch in {PROBE_FILE}: {report.summary()}; {REBUILD}")
    return True


def describe_file(directory: Path, name: str) -> BundleFile:
    """A manifest entry for ``directory / name``: its path, sha256 and size."""
    path = directory / name
    return BundleFile(path=name, sha256=file_sha256(path), size_bytes=path.stat().st_size)


def stored_probe(directory: Path, manifest: BundleManifest, policy: Any, rebuild: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The probe's (images, stage-1 logits, stage-2 logits or None), refused (with the
    ``rebuild`` hint) unless its stored decisions, probabilities and stages follow from
    the policy applied to its own logits."""
    probe = _probe_arrays(directory, manifest, policy)
    z1 = probe["logits"].astype(np.float64)
    z2 = probe["stage2_logits"].astype(np.float64) if is_cascade(policy) else None
    decision, prob, stage = served_outputs(policy, z1, z2)
    if not (np.array_equal(decision, probe["decision"])
            and np.allclose(prob, probe["probability"], rtol=0, atol=1e-9)
            and (z2 is None or np.array_equal(stage, probe["stage"]))):
        raise refuse(directory, f"the served outputs stored in {PROBE_FILE} do not follow from "
                     f"{POLICY_FILE} applied to its logits; {rebuild}")
    return probe["images"], z1, z2
