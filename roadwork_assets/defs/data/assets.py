"""Data assets: source images -> split assignment -> split_manifest[split]."""


import dagster as dg
import pandas as pd

from roadwork_assets.contracts.errors import InsufficientDataError
from roadwork_assets.core.artifacts import (
    atomic_write_parquet,
    code_version,
    frame_fingerprint,
    staged_path,
)
from roadwork_assets.core.data.dedup import check_split_leakage
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.sources import load_source
from roadwork_assets.core.data.splits import assign_splits, check_split_sizes, split_counts
from roadwork_assets.core.data.synthetic import generate_default_dataset
from roadwork_assets.core.calibration.policies import min_calib_positives
from roadwork_assets.defs.metadata import counts_meta, path_meta, table_md
from roadwork_assets.defs.partitions import split_partitions
from roadwork_assets.defs.promotion import publish
from roadwork_assets.defs.resources import (
    ArtifactRegistryResource,
    DatasetSource,
    ExitPolicyResource,
)
from roadwork_assets.defs.split_reads import split_reads_check_spec, split_reads_result

MANIFEST_COLUMNS = ["item_id", "uri", "label", "group_id", "group_key", "pixel_sha256",
                    "phash", "width", "height", "split"]
LEAKAGE_CHECK = "no_cross_split_leakage"


@dg.asset(
    group_name="data",
    check_specs=[split_reads_check_spec("source_images")],
    description="Every usable source image, decoded once and fingerprinted (pixel sha256, "
    "pHash); unusable images are quarantined and listed.",
)
def source_images(
    context: dg.AssetExecutionContext,
    artifacts: ArtifactRegistryResource,
    dataset: DatasetSource,
):
    reg = artifacts.registry
    if dataset.spec is None:
        manifest = generate_default_dataset(
            reg.default_dataset_dir, n_images=dataset.default_n_images,
            seed=dataset.default_seed, image_size=dataset.default_image_size,
        )
        spec, kind = str(manifest), "generated default dataset"
    else:
        spec, kind = dataset.spec, "user dataset (ROADWORK_DATA)"
    context.log.info(f"reading {kind}: {spec}")
    records = load_source(spec, cache_dir=reg.source_cache_dir)

    def progress(done: int, total: int) -> None:
        context.log.info(f"decoded {done}/{total} images")

    ingested, quarantined = ingest_images(records, progress=progress)
    data_version = frame_fingerprint(ingested, ["item_id", "label", "pixel_sha256"])
    stamp = {"data_version": data_version, "code_version": code_version()}
    atomic_write_parquet(staged_path(reg.quarantine_table), quarantined, stamp)
    atomic_write_parquet(staged_path(reg.source_table), ingested, stamp)
    reads_meta, reads_check = split_reads_result(context)
    path, promo = publish(context, [(staged_path(reg.source_table), reg.source_table),
                                    (staged_path(reg.quarantine_table), reg.quarantine_table)],
                          None, [reads_check])
    n_pos = int((ingested["label"] == 1).sum())
    yield dg.Output(
        path,
        metadata={
            "source": dg.MetadataValue.text(spec),
            "source_kind": dg.MetadataValue.text(kind),
            "n_images": dg.MetadataValue.int(len(ingested)),
            "n_positive": dg.MetadataValue.int(n_pos),
            "n_negative": dg.MetadataValue.int(len(ingested) - n_pos),
            "n_quarantined": dg.MetadataValue.int(len(quarantined)),
            "quarantined": table_md(quarantined),
            "data_version": data_version,
            **path_meta(path),
            **reads_meta,
            **promo,
        },
    )
    yield reads_check


@dg.asset(
    group_name="data",
    check_specs=[
        split_reads_check_spec("split_assignment"),
        dg.AssetCheckSpec(LEAKAGE_CHECK, asset="split_assignment", blocking=True,
                          description="no exact duplicate (decoded pixels), near-duplicate "
                          "(pHash) or shared group id across split partitions"),
    ],
    description="Deterministic split of every image into train / val_select / val_calib / "
    "val_test from a hash of its group key (scene id, else pixels; near-duplicates merged).",
)
def split_assignment(
    context: dg.AssetExecutionContext,
    source_images: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
    dataset: DatasetSource,
    exit_policy: ExitPolicyResource,
):
    reg = artifacts.registry
    assignment = assign_splits(source_images, dataset.split_fractions, seed=dataset.split_seed,
                               near_duplicate_distance=dataset.near_duplicate_distance)
    check_split_sizes(assignment, min_calib_positives=min_calib_positives(
        exit_policy.alpha, exit_policy.guarantee, exit_policy.delta,
        exit_policy.calib_fit_fraction))
    assignment = assignment[[c for c in MANIFEST_COLUMNS if c in assignment.columns]]
    report = check_split_leakage(assignment, dataset.near_duplicate_distance)
    data_version = frame_fingerprint(assignment)
    staged = atomic_write_parquet(staged_path(reg.split_assignment), assignment,
                                  {"data_version": data_version, "code_version": code_version()})
    reads_meta, reads_check = split_reads_result(context)
    leakage_check = dg.AssetCheckResult(
        check_name=LEAKAGE_CHECK,
        passed=report.ok,
        metadata={
            "exact_duplicate_sets": report.n_exact_groups,
            "near_duplicate_pairs": report.n_near_pairs,
            "shared_groups": report.n_shared_groups,
            "max_distance": report.max_distance,
            "offenders": dg.MetadataValue.md("\n".join(f"- {e}" for e in report.examples) or "_none_"),
        },
        description=report.summary(),
    )
    path, promo = publish(context, staged, reg.split_assignment, [reads_check, leakage_check])
    yield dg.Output(
        path,
        metadata={
            "counts": counts_meta(split_counts(assignment)),
            "fractions": dg.MetadataValue.json(dataset.split_fractions),
            "data_version": data_version,
            **path_meta(path),
            **reads_meta,
            **promo,
        },
    )
    yield reads_check
    yield leakage_check


@dg.asset(
    group_name="data",
    partitions_def=split_partitions,
    check_specs=[split_reads_check_spec("split_manifest")],
    description="The rows of one split partition (item, file, label, group, hashes).",
)
def split_manifest(
    context: dg.AssetExecutionContext,
    split_assignment: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
):
    split = context.partition_key
    rows = split_assignment[split_assignment["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise InsufficientDataError(f"split {split!r} is empty: re-materialize split_assignment")
    data_version = frame_fingerprint(rows)
    dest = artifacts.registry.split_manifest(split)
    staged = atomic_write_parquet(staged_path(dest), rows, {
        "data_version": data_version, "code_version": code_version(),
        "assignment_version": frame_fingerprint(split_assignment)})
    reads_meta, reads_check = split_reads_result(context)
    path, promo = publish(context, staged, dest, [reads_check])
    n_pos = int((rows["label"] == 1).sum())
    yield dg.Output(
        path,
        metadata={
            "split": dg.MetadataValue.text(split),
            "n_images": dg.MetadataValue.int(len(rows)),
            "n_positive": dg.MetadataValue.int(n_pos),
            "n_negative": dg.MetadataValue.int(len(rows) - n_pos),
            "data_version": data_version,
            "preview": table_md(rows[["item_id", "label", "group_key"]], 10),
            **path_meta(path),
            **reads_meta,
            **promo,
        },
    )
    yield reads_check
