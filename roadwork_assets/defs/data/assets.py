"""Data assets: source images -> split assignment -> split_manifest[split]."""

import json

import dagster as dg
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import (
    atomic_write_parquet,
    code_version,
    frame_fingerprint,
    read_parquet_provenance,
    staged_path,
)
from roadwork_assets.core.calibration.policies import check_calibration_capacity
from roadwork_assets.core.data.balance import SourceBalance, source_sample_weights
from roadwork_assets.core.data.dedup import check_split_leakage
from roadwork_assets.core.data.ingest import ingest_images
from roadwork_assets.core.data.multi_source import SOURCE_COLUMN, SourceSpec, load_sources
from roadwork_assets.core.data.source_stamp import source_stamp
from roadwork_assets.core.data.splits import (
    check_split_sizes,
    split_counts,
    split_images,
    split_shape_report,
)
from roadwork_assets.core.data.synthetic import generate_default_dataset
from roadwork_assets.defs.asset_paths import asset_path
from roadwork_assets.defs.console import progress_reporter
from roadwork_assets.defs.metadata import counts_meta, table_md
from roadwork_assets.defs.partitions import split_partitions
from roadwork_assets.defs.promotion import StagedFiles, materialize_result
from roadwork_assets.defs.resources import (
    ArtifactRegistryResource,
    DatasetSource,
    ExitPolicyResource,
)
from roadwork_assets.defs.settings import merge_records, used_settings
from roadwork_assets.defs.split_reads import split_reads_check_spec

MANIFEST_COLUMNS = ["item_id", "uri", "label", "group_id", "source", "group_key",
                    "pixel_sha256", "phash", "thumb", "width", "height", "split",
                    "sample_weight"]  # sample_weight: only with dataset.source_balance
DEFAULT_SOURCE = "default"  # the generated default dataset's source name
LEAKAGE_CHECK = "no_cross_split_leakage"
SHAPE_CHECK = "split_shape"
SOURCE_STAMP_KEY = "source_stamp"  # `roadwork run` re-reads the source when it changes


@dg.asset(
    group_name="data",
    code_version=code_version(),
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
    progress = progress_reporter(context)
    if dataset.spec is None:
        context.log.info(f"default dataset: {dataset.default_n_images} generated street "
                         f"scenes at {dataset.default_image_size} px in "
                         f"{reg.default_dataset_dir} (generated on first use, then reused)")
        manifest = generate_default_dataset(
            reg.default_dataset_dir, n_images=dataset.default_n_images,
            seed=dataset.default_seed, image_size=dataset.default_image_size,
            progress=progress,
        )
        spec, kind = str(manifest), "generated default dataset"
        specs = [SourceSpec(DEFAULT_SOURCE, spec)]
    else:
        spec, kind = dataset.spec, "user dataset (ROADWORK_DATA)"
        specs = dataset.sources()
    context.log.info(f"reading {kind}: " + ", ".join(f"{s.name}={s.path}" for s in specs))
    # before reading: a file added meanwhile counts as new at the next `roadwork run`
    stamp_before = source_stamp(*(s.path for s in specs))
    records = load_sources(specs, cache_dir=reg.source_cache_dir)
    ingested, quarantined = ingest_images(records, progress=progress)
    data_version = frame_fingerprint(ingested, ["item_id", "label", "pixel_sha256"])
    stamp = {"data_version": data_version, "code_version": code_version(),
             "settings": used_settings(dataset=dataset)}
    dest = asset_path(reg, "source_images")
    atomic_write_parquet(staged_path(reg.quarantine_table), quarantined, stamp)
    atomic_write_parquet(staged_path(dest), ingested, stamp)
    n_pos = int((ingested["label"] == 1).sum())
    return materialize_result(
        context, StagedFiles.at(dest, reg.quarantine_table), data_version=data_version,
        metadata={
            "source": dg.MetadataValue.text(spec),
            "source_kind": dg.MetadataValue.text(kind),
            "n_images": dg.MetadataValue.int(len(ingested)),
            "n_positive": dg.MetadataValue.int(n_pos),
            "n_negative": dg.MetadataValue.int(len(ingested) - n_pos),
            "n_quarantined": dg.MetadataValue.int(len(quarantined)),
            "n_sources": dg.MetadataValue.int(len(specs)),
            "per_source": table_md(_per_source_counts(ingested, specs)),
            "quarantined": table_md(quarantined),
            "data_version": data_version,
            SOURCE_STAMP_KEY: dg.MetadataValue.text(stamp_before),
        },
    )


@dg.asset(
    group_name="data",
    code_version=code_version(),
    check_specs=[
        split_reads_check_spec("split_assignment"),
        dg.AssetCheckSpec(LEAKAGE_CHECK, asset="split_assignment", blocking=True,
                          description="no exact duplicate (decoded pixels), near-duplicate "
                          "(pHash confirmed by thumbnails) or shared group id across split "
                          "partitions"),
        dg.AssetCheckSpec(SHAPE_CHECK, asset="split_assignment", blocking=True,
                          description="realised split fractions within a group-aware binomial "
                          "tolerance of the configured ones; no group above max_group_share"),
    ],
    description="Deterministic split of every image into train / val_select / val_calib / "
    "val_test from a hash of its group key (scene id, else pixels; copies of one photo merged; existing images keep their split).",
)
def split_assignment(
    context: dg.AssetExecutionContext,
    source_images: pd.DataFrame,
    artifacts: ArtifactRegistryResource,
    dataset: DatasetSource,
    exit_policy: ExitPolicyResource,
):
    dest = asset_path(artifacts.registry, "split_assignment")
    settings = json.dumps(dataset.split_settings(), sort_keys=True)
    previous = _previous_assignment(context, dest, settings)
    result = split_images(source_images, dataset.split_fractions, seed=dataset.split_seed,
                          rule=dataset.near_duplicate_rule(), previous=previous,
                          progress=progress_reporter(context),
                          holdout_source=dataset.holdout_source)
    assignment = _with_sample_weights(result.assignment, dataset)
    if result.previous_note:
        context.log.warning(result.previous_note)
    check_split_sizes(assignment)
    calib = assignment[assignment["split"] == "val_calib"]
    # the same fit / threshold split, by group, that the policy assets will make
    calib_units = check_calibration_capacity(
        calib["item_id"].tolist(), calib["label"].to_numpy(), calib["group_key"].tolist(),
        alpha=exit_policy.alpha, guarantee=exit_policy.guarantee, delta=exit_policy.delta,
        fit_fraction=exit_policy.calib_fit_fraction)
    assignment = assignment[[c for c in MANIFEST_COLUMNS if c in assignment.columns]]
    report = check_split_leakage(assignment, dataset.near_duplicate_rule())
    shape = split_shape_report(assignment, dataset.split_fractions, dataset.max_group_share,
                               holdout_source=dataset.holdout_source)
    data_version = frame_fingerprint(assignment.drop(columns=["thumb"], errors="ignore"))
    atomic_write_parquet(staged_path(dest), assignment,
                         {"data_version": data_version, "code_version": code_version(),
                          "split_settings": settings,
                          "settings": merge_records(
                              source_images.attrs.get("provenance", {}).get("settings"),
                              used_settings(dataset=dataset, exit_policy=exit_policy))})
    leakage_check = _leakage_check(report, assignment)
    largest = shape.largest_groups[["group_key", "n_images", "n_positive", "share", "split",
                                    "examples"]]
    shape_check = dg.AssetCheckResult(
        check_name=SHAPE_CHECK,
        passed=shape.ok,
        metadata={
            "realised_fractions": dg.MetadataValue.json(shape.realised),
            "tolerance": dg.MetadataValue.json(shape.tolerance),
            "max_group_images": shape.max_group_images,
            "largest_groups": table_md(largest, 10),
        },
        description=shape.summary(),
    )
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version,
        checks=[leakage_check, shape_check],
        metadata={
            "counts": counts_meta(split_counts(assignment)),
            "fractions": dg.MetadataValue.json(dataset.split_fractions),
            "realised_fractions": dg.MetadataValue.json(shape.realised),
            "largest_groups": table_md(largest, 10),
            "largest_group_images": dg.MetadataValue.int(int(largest["n_images"].iloc[0])
                                                         if len(largest) else 0),
            "n_groups": dg.MetadataValue.int(int(assignment["group_key"].nunique())),
            "val_calib_threshold_units_with_roadwork": dg.MetadataValue.int(calib_units),
            "kept_from_previous_assignment": dg.MetadataValue.int(result.n_kept_from_previous),
            "n_held_out": dg.MetadataValue.int(len(result.held_out)),
            "holdout_source": dg.MetadataValue.text(dataset.holdout_source or "none"),
            "per_source_splits": table_md(_per_source_splits(assignment)),
            "held_out": table_md(result.held_out),
            "data_version": data_version,
        },
    )


def _leakage_check(report, assignment: pd.DataFrame) -> dg.AssetCheckResult:
    """The blocking no_cross_split_leakage result, over every source together."""
    return dg.AssetCheckResult(
        check_name=LEAKAGE_CHECK,
        passed=report.ok,
        metadata={
            "exact_duplicate_sets": report.n_exact_groups,
            "near_duplicate_pairs": report.n_near_pairs,
            "shared_groups": report.n_shared_groups,
            "max_distance": report.max_distance,
            "possible_copy_pairs_across_splits": report.n_possible_pairs,
            "groups_spanning_sources": _groups_spanning_sources(assignment),
            "offenders": dg.MetadataValue.md("\n".join(f"- {e}" for e in report.examples) or "_none_"),
        },
        description=report.summary(),
    )


def _per_source_counts(ingested: pd.DataFrame, specs: list[SourceSpec]) -> pd.DataFrame:
    """One row per source: name, path, images, positives."""
    by = ingested.groupby(SOURCE_COLUMN)["label"]
    n, pos = by.size(), by.sum()
    return pd.DataFrame([{"source": s.name, "path": s.path, "n_images": int(n.get(s.name, 0)),
                          "n_positive": int(pos.get(s.name, 0))} for s in specs])


def _per_source_splits(assignment: pd.DataFrame) -> pd.DataFrame:
    """Images per source (rows) and split (columns)."""
    if SOURCE_COLUMN not in assignment.columns:
        return pd.DataFrame()
    table = pd.crosstab(assignment[SOURCE_COLUMN], assignment["split"])
    return table.reindex(columns=list(SPLITS), fill_value=0).reset_index()


def _groups_spanning_sources(assignment: pd.DataFrame) -> int:
    """Groups (copies of one photo merged across sources) holding more than one source."""
    if SOURCE_COLUMN not in assignment.columns:
        return 0
    return int((assignment.groupby("group_key")[SOURCE_COLUMN].nunique() > 1).sum())


def _with_sample_weights(assignment: pd.DataFrame, dataset: DatasetSource) -> pd.DataFrame:
    """Train rows' draw weights per source (core.data.balance) as ``sample_weight``; every
    other split 1.0 (never balanced: see core.data.balance). No column when balance is
    none, so unbalanced manifests stay as they were."""
    if dataset.source_balance == "none":
        return assignment
    out = assignment.copy()
    train = (out["split"] == "train").to_numpy()
    out["sample_weight"] = 1.0
    out.loc[train, "sample_weight"] = source_sample_weights(
        out.loc[train, SOURCE_COLUMN].tolist(),
        SourceBalance(mode=dataset.source_balance, weights=dataset.source_weights))
    return out


def _previous_assignment(context, path, settings: str) -> pd.DataFrame | None:
    """The last promoted assignment, when it was made with the same split settings.

    Reusing it is what keeps every existing image in its split when images are added
    or removed (core.data.splits.split_images). Read by path on purpose: it is this
    asset's own earlier output, not an input.
    """
    if not path.exists():
        return None
    try:
        stamp = read_parquet_provenance(path)
        if stamp.get("split_settings") != settings:
            context.log.warning(
                "split settings changed since the last split assignment (or it predates them): "
                "re-splitting from scratch, so existing images may move between splits")
            return None
        return pd.read_parquet(path, columns=["pixel_sha256", "split", "group_key", "group_id"])
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise BadInputError(
            f"the previous split assignment {path} cannot be read ({type(exc).__name__}: "
            f"{str(exc)[:120]}); delete it to re-split from scratch (existing images may then "
            "move between splits)") from exc


@dg.asset(
    group_name="data",
    partitions_def=split_partitions,
    code_version=code_version(),
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
    data_version = frame_fingerprint(rows.drop(columns=["thumb"], errors="ignore"))
    dest = asset_path(artifacts.registry, "split_manifest", split)
    atomic_write_parquet(staged_path(dest), rows, {
        "data_version": data_version, "code_version": code_version(),
        "assignment_version": frame_fingerprint(
            split_assignment.drop(columns=["thumb"], errors="ignore")),
        # no settings of its own: those that made the assignment
        "settings": split_assignment.attrs.get("provenance", {}).get("settings") or {}})
    n_pos = int((rows["label"] == 1).sum())
    return materialize_result(
        context, StagedFiles.at(dest), data_version=data_version,
        metadata={
            "split": dg.MetadataValue.text(split),
            "n_images": dg.MetadataValue.int(len(rows)),
            "n_positive": dg.MetadataValue.int(n_pos),
            "n_negative": dg.MetadataValue.int(len(rows) - n_pos),
            "data_version": data_version,
            "preview": table_md(rows[["item_id", "label", "group_key"]], 10),
        },
    )
