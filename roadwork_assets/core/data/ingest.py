"""Decode every source image once and fingerprint it; set broken ones aside.

Why quarantine instead of failing: one corrupt JPEG among 100k photos is normal for
real collections and says nothing about the other 99,999; stopping the run would make
the user fix files one crash at a time. Each unusable image is instead listed with the
reason (``BadInputError`` message: it names the item and what to do) in the second
returned table, which the asset layer shows as metadata. What is *not* quarantined,
because no per-image fix is implied and carrying on would train on wrong truth:

- the same pixels carrying both labels -> ``BadInputError`` naming both items;
- nothing usable at all -> ``InsufficientDataError``.

Identical pixels with the same label are fine here (within one split they only weight
the item twice); across splits they are leakage, found by ``dedup``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError, InsufficientDataError
from roadwork_assets.core.data.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    decode_image,
    perceptual_hash,
    pixel_sha256,
)
from roadwork_assets.core.data.similarity import thumbnail
from roadwork_assets.core.data.sources import RECORD_COLUMNS, source_quarantine
from roadwork_assets.core.progress import Progress, no_progress

__all__ = ["QUARANTINE_COLUMNS", "ingest_images"]

QUARANTINE_COLUMNS = ("item_id", "uri", "reason")
_MAX_LISTED = 10


def ingest_images(
    records: pd.DataFrame,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Progress = no_progress,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode and fingerprint each record; return ``(ingested, quarantined)``.

    ``ingested`` is ``records`` (good rows, original order) plus ``pixel_sha256``,
    ``phash`` (16 hex chars), ``thumb`` (32x32 grey thumbnail, 1024 bytes: the second
    near-duplicate signal, see ``core.data.similarity``), ``width`` and ``height`` (after EXIF orientation).
    ``quarantined`` has ``item_id``, ``uri``, ``reason`` and also lists rows the source
    reader set aside (``records.attrs["quarantine"]``). Images are dropped as soon as
    they are hashed, so memory stays at one decoded image, which ``max_bytes`` bounds
    (images whose decode would need more are quarantined, see ``decode_peak_bytes``).
    ``progress("decode images", done, total)`` is called after every image (a
    ``core.progress.ProgressReporter`` throttles the lines).
    """
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise BadInputError(
            f"ingest_images: records lack column(s) {missing}; columns present: "
            f"{list(records.columns)}. Build records with core.data.sources.load_source."
        )
    total = len(records)
    good = np.zeros(total, dtype=bool)
    sha = np.empty(total, dtype=object)
    phash = np.empty(total, dtype=object)
    thumb = np.empty(total, dtype=object)
    width = np.zeros(total, dtype=np.int32)
    height = np.zeros(total, dtype=np.int32)
    quarantined: list[dict] = []
    for i, (item_id, uri) in enumerate(zip(records["item_id"], records["uri"])):
        progress("decode images", i, total)
        try:
            img = decode_image(Path(uri), str(item_id), max_pixels=max_pixels, max_bytes=max_bytes)
        except BadInputError as exc:
            quarantined.append({"item_id": item_id, "uri": uri, "reason": str(exc)})
            continue
        try:
            sha[i] = pixel_sha256(img)
            phash[i] = f"{perceptual_hash(img):016x}"
            thumb[i] = thumbnail(img)
            width[i], height[i] = img.size
            good[i] = True
        finally:
            img.close()
    progress("decode images", total, total)

    ingested = records.loc[good].copy()
    ingested["pixel_sha256"] = sha[good]
    ingested["phash"] = phash[good]
    ingested["thumb"] = thumb[good]
    ingested["width"] = width[good]
    ingested["height"] = height[good]
    ingested = ingested.reset_index(drop=True)
    ingested.attrs = {}
    quarantine = pd.concat(
        [source_quarantine(records), pd.DataFrame(quarantined, columns=list(QUARANTINE_COLUMNS))],
        ignore_index=True,
    )
    if ingested.empty:
        if len(quarantine) == 0:
            raise InsufficientDataError(
                "the source lists no images, so there is nothing to ingest: check that the "
                "source path points at the images."
            )
        reasons = "; ".join(quarantine["reason"].head(3))
        what = "the only image could not" if total == 1 else f"none of the {total} images could"
        raise InsufficientDataError(
            f"{what} be used (all quarantined), e.g.: {reasons}. "
            "Check that the source path points at the images."
        )
    _refuse_conflicting_labels(ingested)
    return ingested, quarantine


def _refuse_conflicting_labels(ingested: pd.DataFrame) -> None:
    labels_per_hash = ingested.groupby("pixel_sha256", sort=False)["label"].nunique()
    conflicting = labels_per_hash.index[labels_per_hash > 1]
    if len(conflicting) == 0:
        return
    examples = []
    for digest in conflicting[:_MAX_LISTED]:
        rows = ingested.loc[ingested["pixel_sha256"] == digest, ["item_id", "label"]].drop_duplicates("label")
        examples.append(" vs ".join(f"{i!r} (label {lab})" for i, lab in zip(rows["item_id"], rows["label"])))
    more = f" (and {len(conflicting) - _MAX_LISTED} more)" if len(conflicting) > _MAX_LISTED else ""
    raise BadInputError(
        f"{len(conflicting)} image(s) have identical pixels but conflicting labels: "
        f"{'; '.join(examples)}{more}. One of each pair is mislabelled: fix the label "
        "at the source or remove one of the copies."
    )
