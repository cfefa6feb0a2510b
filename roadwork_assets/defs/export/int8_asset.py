"""The optional INT8 bundle: the fp32 bundle's networks dynamically quantized, its policy
re-certified on the quantized model's own val_calib scores (``core.export.int8_bundle``).

Optional: tagged so ``roadwork run`` (``runner.stages``) leaves it out; materialize it on
its own (the UI, or ``dagster asset materialize --select bundle_int8``). It never touches
the fp32 bundle or ``bundles/LATEST``; its bundles live in ``bundles_int8/`` with their own
``LATEST``. A policy fitter: it reads val_calib only (images, labels, and the fp32 logits
for the comparison it reports), never val_test.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.core.artifacts import code_version, combine_versions
from roadwork_assets.core.export.bundle import load_bundle, verify_bundle
from roadwork_assets.core.export.cascade_serving import is_cascade
from roadwork_assets.core.export.int8_bundle import Int8Fit, build_int8_bundle
from roadwork_assets.core.export.quantize import (
    CalibScores,
    QuantizeConfig,
    decoder,
    ort_latency,
    score_images,
    served_metrics,
)
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.freshness import OPTIONAL_TAG
from roadwork_assets.defs.partitions import POLICY_FITTING_SPLITS
from roadwork_assets.defs.promotion import LatestBundle, materialize_result
from roadwork_assets.defs.resources import ArtifactRegistryResource, ExitPolicyResource
from roadwork_assets.defs.settings import used_settings
from roadwork_assets.defs.split_reads import split_reads_check_spec

NAME = "bundle_int8"
INT8_CHECK = "int8_bundle_verifies"


@dg.asset(
    name=NAME,
    group_name="export",
    ins={"bundle": dg.AssetIn(),
         "split_manifest": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS),
         "logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS),
         "multiview_logits": dg.AssetIn(partition_mapping=POLICY_FITTING_SPLITS)},
    tags={OPTIONAL_TAG: "true"},
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec(NAME),
        dg.AssetCheckSpec(INT8_CHECK, asset=NAME, blocking=True,
                          description="closed INT8 bundle (every sha256 matches), its policy "
                          "fitted on these INT8 files' scores with FNR bound <= alpha, and "
                          "ONNX Runtime reproduces the stored probe outputs"),
    ],
    description="Optional INT8 (ONNX Runtime dynamic quantization) copy of the bundle: "
    "the exit policy is re-certified on the quantized model's own val_calib scores and the "
    "build is refused when its FNR guarantee no longer holds. Served by ONNX Runtime only.",
)
def bundle_int8(
    context: dg.AssetExecutionContext,
    bundle: Path,
    split_manifest: dict[str, pd.DataFrame],
    logits: dict[str, dict[str, np.ndarray]],
    multiview_logits: dict[str, dict[str, np.ndarray]],
    artifacts: ArtifactRegistryResource,
    exit_policy: ExitPolicyResource,
):
    fp32 = load_bundle(bundle)
    calib = logits["val_calib"]
    uris = _calib_uris(split_manifest["val_calib"], calib)
    config = QuantizeConfig()
    fit = _int8_fit(context, fp32, calib, uris, exit_policy, config)
    reg = artifacts.registry
    pointer = asset_path(reg, NAME)
    result = build_int8_bundle(fp32, pointer.parent, fit, config)
    try:
        verify_bundle(result.directory)
        verified = dg.AssetCheckResult(check_name=INT8_CHECK, passed=True, metadata={
            "crc_bound": float(getattr(result.policy, "crc_bound", float("nan"))),
            "alpha": float(result.policy.alpha)})
    except ArtifactIntegrityError as exc:
        verified = dg.AssetCheckResult(check_name=INT8_CHECK, passed=False, description=str(exc))
    z2 = multiview_logits["val_calib"]["logits"] if is_cascade(fp32.policy) else None
    before = served_metrics(fp32.policy, calib["logits"], z2, calib["labels"])
    after = served_metrics(result.policy, result.scores.view_logits,
                           result.scores.stage2_logits, result.scores.labels)
    m = result.manifest
    return materialize_result(
        context, LatestBundle(pointer, m.bundle_id, result.directory),
        data_version=m.provenance.data_version, checks=[verified],
        metadata={
            "bundle_id": m.bundle_id, "source_bundle_id": m.source_bundle_id,
            "bundle_dir": dg.MetadataValue.path(str(result.directory)),
            "precision": m.precision, "policy_kind": m.policy_kind,
            "quantization": dg.MetadataValue.json(m.quantization),
            **{f"val_calib_{k}_fp32": float(v) for k, v in before.items()},
            **{f"val_calib_{k}_int8": float(v) for k, v in after.items()},
            **_sizes_and_latency(fp32.directory, result.directory, m.img_size),
        },
    )


def _calib_uris(manifest: pd.DataFrame, calib: dict[str, np.ndarray]) -> list[str]:
    """val_calib's image files in the row order of logits[val_calib] (what the fp32
    policy was fitted on), refused when the two disagree."""
    ids = manifest["item_id"].astype(str).to_numpy()
    if not np.array_equal(ids, calib["item_ids"].astype(str)):
        raise ArtifactIntegrityError(
            "split_manifest[val_calib] and logits[val_calib] hold other images (or another "
            "order): re-materialize logits[val_calib] and the bundle before `bundle_int8`")
    return manifest["uri"].astype(str).tolist()


def _int8_fit(context, fp32, calib, uris, exit_policy: ExitPolicyResource,
              config: QuantizeConfig) -> Int8Fit:
    cascade = is_cascade(fp32.policy)
    size, n_views = fp32.manifest.img_size, fp32.manifest.n_views
    ids = calib["item_ids"].astype(str).tolist()
    load = decoder(uris, ids, size)

    def scores_fn(engine) -> CalibScores:
        context.log.info(f"scoring {len(ids)} val_calib images with the INT8 network(s)")
        z1, z2 = score_images(engine, load, len(ids), n_views, cascade, config.batch_size)
        return CalibScores(view_logits=z1, stage2_logits=z2, labels=calib["labels"],
                           item_ids=ids, group_keys=calib["group_keys"].astype(str).tolist())

    configured = (exit_policy.latency_stage1_s, exit_policy.latency_stage2_s)
    # the INT8 networks' own ORT batch-1 latency is measured where not configured
    cascade_config = exit_policy.cascade_config(0.0, 0.0) if cascade else None
    return Int8Fit(scores_fn=scores_fn, policy_config=exit_policy.to_config(),
                   cascade_config=cascade_config,
                   configured_latency=configured if cascade else None,
                   data_version=combine_versions({"logits[val_calib]": str(calib["data_version"]),
                                                  "bundle": fp32.manifest.bundle_id}),
                   settings=used_settings(exit_policy=exit_policy))


def _sizes_and_latency(fp32_dir: Path, int8_dir: Path, img_size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("model.onnx", "stage2.onnx"):
        if not (int8_dir / name).is_file():
            continue
        stem = name.removesuffix(".onnx")
        a, b = (d / name for d in (fp32_dir, int8_dir))
        out[f"{stem}_mb_fp32"] = a.stat().st_size / 1e6
        out[f"{stem}_mb_int8"] = b.stat().st_size / 1e6
        out[f"{stem}_latency_ms_fp32"] = 1e3 * ort_latency(a, img_size)
        out[f"{stem}_latency_ms_int8"] = 1e3 * ort_latency(b, img_size)
    return out
