"""The INT8 bundle: an fp32 bundle's ONNX networks dynamically quantized, with its exit
policy re-certified on the quantized model's own val_calib scores (``quantize``).

Layout: the fp32 bundle's (``BUNDLE_LAYOUT``), closed and hashed the same way; model.onnx
(and a cascade's stage2.onnx) are the INT8 networks, policy.json is the re-fitted policy,
probe.npz stores what the INT8 networks serve on the fp32 bundle's probe images.
model.pt and stage2.json are byte copies (lineage: the policy names the checkpoint, stage
2 and the INT8 files it was fitted on). The manifest records ``precision:
int8-dynamic``, ``source_bundle_id`` (the fp32 bundle) and the quantization settings.

Checked on every load (``check_int8_probe``, in place of the fp32 torch-vs-ONNX probe):
the policy was fitted on exactly these INT8 files (their sha256 in its provenance), the
stored served outputs follow from the policy applied to the stored logits, and ONNX
Runtime re-running the INT8 files on the probe images reproduces the stored logits'
served outputs within the fp32 tolerance of the model (the integer part of an INT8 op
is exact; what may differ between runs is the fp32 rounding around it). torch never
serves an INT8 bundle: its scores are not the ones the policy was certified on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import BundleManifest
from roadwork_assets.core.artifacts import (
    _UMASK,
    atomic_write_json,
    atomic_write_npz,
    file_sha256,
    make_provenance,
    publish_directory,
    read_npz,
    remove_tree_quietly,
)
from roadwork_assets.core.export.bundle_checks import (
    CHECKPOINT_FILE,
    MANIFEST,
    ONNX_FILE,
    POLICY_FILE,
    PROBE_FILE,
    REBUILD,
    content_id,
    describe_file,
    refuse,
    stored_probe,
)
from roadwork_assets.core.export.cascade_serving import (
    is_cascade,
    served_outputs,
    stage1_served,
    stage2_served,
    torch_stage2_logits,
)
from roadwork_assets.core.export.engines import OnnxEngine
from roadwork_assets.core.export.onnx_export import judge_served, torch_probe_logits
from roadwork_assets.core.export.quantize import (
    PRECISION_INT8,
    CalibScores,
    QuantizeConfig,
    quantize_onnx,
    refit_policy,
)
from roadwork_assets.core.export.stage2_checks import STAGE2_FILE, STAGE2_ONNX_FILE

INT8_SETTINGS = "int8_onnx"  # policy.provenance.settings group naming the INT8 files


@dataclass
class Int8Fit:
    """What the INT8 policy is re-fitted with: val_calib scored by the INT8 networks
    (``scores``), the fitting settings of the fp32 policy's asset, and its data version."""

    scores_fn: Any  # (OnnxEngine) -> CalibScores: val_calib scored by that engine
    policy_config: Any  # PolicyFitConfig
    cascade_config: Any = None  # CascadeConfig (cascade only); latencies replaced if None
    data_version: str = ""
    # cascade: (stage 1 s, stage 2 s) as configured, None where the INT8 network's ORT
    # batch-1 latency is measured instead; None: cascade_config's latencies as given
    configured_latency: tuple[float | None, float | None] | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # settings_record of the asset


@dataclass
class Int8Result:
    directory: Path
    manifest: BundleManifest
    policy: Any
    scores: CalibScores
    quantized: dict[str, dict[str, Any]]  # file -> quantize_onnx's record


def build_int8_bundle(fp32: Any, out_dir: Path, fit: Int8Fit,
                      config: QuantizeConfig | None = None) -> Int8Result:
    """Quantize a loaded, verified fp32 ``Bundle``, re-fit its policy kind on the INT8
    scores (refused, ``GuaranteeNotMet``, when the guarantee no longer holds), and publish
    the closed INT8 bundle under its content id in ``out_dir``. Nothing is published on
    any refusal. ``LATEST`` is the caller's (after its checks)."""
    config = config or QuantizeConfig()
    src, cascade = Path(fp32.directory), is_cascade(fp32.policy)
    if "onnx" not in fp32.manifest.files:
        raise ArtifactIntegrityError(f"bundle {src} has no model.onnx to quantize: rebuild it "
                                     "with exit_policy.export_onnx=true")
    if fp32.manifest.precision != "fp32":
        raise ArtifactIntegrityError(f"bundle {src} is already {fp32.manifest.precision}: "
                                     "quantize the fp32 bundle it came from")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out_dir))
    staging.chmod(0o777 & ~_UMASK)
    try:
        names = [ONNX_FILE] + ([STAGE2_ONNX_FILE] if cascade else [])
        quantized = {n: quantize_onnx(src / n, staging / n, config) for n in names}
        for name in [CHECKPOINT_FILE] + ([STAGE2_FILE] if cascade else []):
            shutil.copyfile(src / name, staging / name)
        engine = OnnxEngine(staging, cascade, per_image=True)  # as served
        scores = fit.scores_fn(engine)
        policy = _refit(fp32, fit, scores, staging, names)
        atomic_write_json(staging / POLICY_FILE, policy)
        _write_probe(src, staging, policy, engine, fp32.manifest.n_views)
        manifest = _manifest(fp32.manifest, staging, policy, quantized, config)
        atomic_write_json(staging / MANIFEST, manifest)
        dest = out_dir / manifest.bundle_id
        if dest.exists():  # the same content again: keep the published copy
            remove_tree_quietly(staging)
        else:
            publish_directory(staging, dest)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    return Int8Result(dest, manifest, policy, scores, quantized)


def _refit(fp32: Any, fit: Int8Fit, scores: CalibScores, staging: Path,
           names: list[str]) -> Any:
    """The fp32 policy's kind, fitted on the INT8 scores, bound to the INT8 files."""
    kind = fp32.policy.kind
    cascade_config, source = _latencies(fit, staging, fp32.manifest.img_size)
    policy = refit_policy(kind, scores, fit.policy_config, cascade_config)
    update: dict[str, Any] = {}
    if kind == "cascade":
        update["stage2_sha256"] = fp32.policy.stage2_sha256  # the same stage2.json
        update["latency_source"] = source
    record = {n: file_sha256(staging / n) for n in names}
    settings = {**fit.settings, INT8_SETTINGS: {
        "sha256": "".join(record[n] for n in names), "values": record}}
    update["provenance"] = make_provenance(
        fit.data_version, fp32.manifest.provenance.checkpoint_sha256, settings=settings)
    return policy.model_copy(update=update)


def _latencies(fit: Int8Fit, staging: Path, img_size: int) -> tuple[Any, str]:
    """The cascade settings with each stage's latency: configured, or the INT8 file's
    ORT batch-1 median on this machine (what serving it costs)."""
    if fit.cascade_config is None or fit.configured_latency is None:
        return fit.cascade_config, "configured"
    from roadwork_assets.core.export.quantize import ort_latency

    c1, c2 = fit.configured_latency
    lat1 = c1 if c1 is not None else ort_latency(staging / ONNX_FILE, img_size)
    lat2 = c2 if c2 is not None else ort_latency(staging / STAGE2_ONNX_FILE, img_size)
    config = fit.cascade_config.model_copy(update={"latency_stage1_s": lat1,
                                                   "latency_stage2_s": lat2})
    return config, "measured" if None in (c1, c2) else "configured"


def _write_probe(src: Path, staging: Path, policy: Any, engine: OnnxEngine,
                 n_views: int) -> None:
    """The fp32 bundle's probe images and what the INT8 networks serve on them."""
    images = read_npz(src / PROBE_FILE)["images"]
    z1 = engine.view_logits(images, n_views, len(images))
    z2 = engine.stage2_logits(images, len(images)) if is_cascade(policy) else None
    decision, prob, stage = served_outputs(
        policy, z1.astype(np.float64), None if z2 is None else z2.astype(np.float64))
    extra = {} if z2 is None else {"stage2_logits": z2.astype(np.float32), "stage": stage}
    atomic_write_npz(staging / PROBE_FILE, images=images, logits=z1.astype(np.float32),
                     probability=prob.astype(np.float64), decision=decision.astype(np.int8),
                     **extra)


def _manifest(source: BundleManifest, staging: Path, policy: Any,
              quantized: dict[str, dict[str, Any]], config: QuantizeConfig) -> BundleManifest:
    described = {role: describe_file(staging, f.path) for role, f in source.files.items()}
    return source.model_copy(update={
        "bundle_id": content_id(described), "files": described, "precision": PRECISION_INT8,
        "source_bundle_id": source.bundle_id,
        "quantization": {**config.record(), "files": quantized},
        "provenance": policy.provenance.model_copy(
            update={"settings": None}),  # the policy's data version, checkpoint, now
    })


# ------------------------------------------------------------------- load-time
def check_int8_probe(directory: Path, manifest: BundleManifest, policy: Any, model: Any,
                     stage2_model: Any, check_onnx: bool) -> bool:
    """The INT8 checks of ``load_bundle`` (module docstring). True if ONNX Runtime ran."""
    _check_policy_names_files(directory, manifest, policy)
    images, z1, z2 = stored_probe(directory, manifest, policy, REBUILD_INT8)
    if not check_onnx:
        return False
    engine = _engine(directory, manifest, policy)
    _, tol = torch_probe_logits(model, images, manifest.n_views)  # the fp32 rounding scale
    reports = [("model.onnx", judge_served(policy, z1, engine.view_logits(
        images, manifest.n_views, len(images)), tol, serve=stage1_served))]
    if z2 is not None:
        _, tol2 = torch_stage2_logits(stage2_model, images)
        again = engine.stage2_logits(images, len(images))
        reports.append(("stage2.onnx", judge_served(
            policy, z2[:, None], again[:, None], tol2[:, None], serve=stage2_served)))
    for name, report in reports:
        if not report.passed:
            raise refuse(directory, f"{name} ({PRECISION_INT8}) no longer serves the outputs "
                         f"stored in {PROBE_FILE}: {report.summary()}; the INT8 network was "
                         f"replaced, or this CPU's int8 kernels differ; {REBUILD_INT8}")
    return True


REBUILD_INT8 = "rebuild it (materialize `bundle_int8`)"


def _engine(directory: Path, manifest: BundleManifest, policy: Any) -> OnnxEngine:
    try:
        return OnnxEngine(directory, is_cascade(policy), threads=1, per_image=True)
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise refuse(directory, f"an ONNX file of this {manifest.precision} bundle does not "
                     f"load in ONNX Runtime ({first}); {REBUILD_INT8}") from exc


def _check_policy_names_files(directory: Path, manifest: BundleManifest, policy: Any) -> None:
    """policy.json was fitted on the scores of exactly these INT8 files."""
    settings = (policy.provenance.settings or {}) if policy.provenance else {}
    named = (settings.get(INT8_SETTINGS) or {}).get("values") or {}
    have = {f.path: f.sha256 for role, f in manifest.files.items()
            if role in ("onnx", "stage2_onnx")}
    if named != have:
        said = json.dumps({k: v[:12] for k, v in named.items()}) if named else "no INT8 files"
        raise refuse(directory, f"{POLICY_FILE} was fitted on the scores of {said}, but the "
                     f"bundle's INT8 files are {json.dumps({k: v[:12] for k, v in have.items()})}"
                     f": its FNR guarantee was certified for other scores; {REBUILD_INT8}")
    if manifest.provenance.checkpoint_sha256 != manifest.files["checkpoint"].sha256:
        raise refuse(directory, f"{MANIFEST} names another checkpoint than {CHECKPOINT_FILE}; "
                     f"{REBUILD}")
