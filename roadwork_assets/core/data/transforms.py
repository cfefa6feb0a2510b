"""Image -> model input, the same way at training, evaluation and serving time.

StreetVision's validator centre-crops to a square and resizes (augmentation level 0, see
docs/domain.md), so we do the same: fit the largest centred square, resize to
``img_size`` (bicubic).
Images are cached as uint8 [3, S, S]; the model divides by 255 and normalises.

Many files are decoded by :func:`iter_model_batches`: batch by batch, on a thread pool
(Pillow releases the GIL while it decodes and resizes), at most two batches in memory
at once, so memory depends on the batch size and not on the number of files. JPEGs are
decoded at reduced size (:data:`DRAFT_FACTOR`): the resize to ``img_size`` that follows
sees at least twice its output size, so the result stays within a few grey levels of
a full decode (``test_transforms.py::test_draft_decode_matches_full_decode``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from roadwork_assets.core.data.images import decode_image
from roadwork_assets.core.progress import Progress, no_progress

# JPEGs decode at the smallest DCT scale keeping both sides >= DRAFT_FACTOR * img_size;
# 2x keeps the bicubic resize's anti-aliasing in play (1x visibly aliases fine texture)
DRAFT_FACTOR = 2
DECODE_STAGE = "decode + resize"


def to_model_array(img: Image.Image, img_size: int) -> np.ndarray:
    """RGB PIL image -> uint8 [3, S, S], centre square crop + bicubic resize."""
    fitted = ImageOps.fit(img, (img_size, img_size), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_model_array(source: bytes | Path | str, item: str, img_size: int) -> np.ndarray:
    """One file (or encoded bytes) -> uint8 [3, S, S], JPEGs decoded in draft mode."""
    return to_model_array(decode_image(source, item, draft_size=DRAFT_FACTOR * img_size),
                          img_size)


def default_workers() -> int:
    """Decode threads: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def iter_model_batches(uris: list[str], item_ids: list[str], img_size: int, *,
                       batch_size: int = 64, workers: int | None = None,
                       progress: Progress = no_progress, stage: str = DECODE_STAGE
                       ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, uint8 [b, 3, S, S])`` for consecutive batches of the files, in order.

    The next batch decodes on the pool while the caller consumes this one. A bad file
    raises ``BadInputError`` naming its item, as ``decode_image`` does.
    """
    if len(uris) != len(item_ids):
        raise ValueError(f"{len(uris)} uris but {len(item_ids)} item ids")
    n = len(uris)
    starts = range(0, n, max(1, batch_size))
    progress(stage, 0, n)
    # decode_image silences PIL's bomb warning in a catch_warnings block, which is not
    # thread-safe (the threads save and restore one global filter list): installing the
    # same filter around the whole pool makes every interleaving end where it began
    with warnings.catch_warnings(), ThreadPoolExecutor(workers or default_workers()) as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

        def submit(start: int) -> list[Future]:
            return [pool.submit(load_model_array, Path(uris[i]), item_ids[i], img_size)
                    for i in range(start, min(n, start + batch_size))]

        pending = submit(starts[0]) if n else []
        for k, start in enumerate(starts):
            current = pending
            pending = submit(starts[k + 1]) if k + 1 < len(starts) else []
            try:
                batch = np.stack([f.result() for f in current])
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
            yield start, batch
            progress(stage, start + len(batch), n)


def load_model_arrays(uris: list[str], item_ids: list[str], img_size: int,
                      progress: Progress = no_progress, workers: int | None = None) -> np.ndarray:
    """Decode and preprocess many files -> uint8 [N, 3, S, S], all in memory (for small
    sets; caches of a whole split stream through :func:`iter_model_batches`)."""
    out = np.empty((len(uris), 3, img_size, img_size), dtype=np.uint8)
    for start, batch in iter_model_batches(uris, item_ids, img_size, workers=workers,
                                           progress=progress):
        out[start : start + len(batch)] = batch
    return out


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    return batch_uint8.float().div_(255.0)


def make_views(images: torch.Tensor, n_views: int) -> list[torch.Tensor]:
    """Deterministic test-time views of a float batch: identity, h-flip, centre zoom.

    Views feed the multi-view disagreement signal of the failure gate. Corner crops are
    left out on purpose: they can cut the only cone out of the frame.
    """
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    views = [images]
    if n_views >= 2:
        views.append(torch.flip(images, dims=[3]))
    if n_views >= 3:
        size = images.shape[-1]
        crop = int(round(size * 0.85))
        off = (size - crop) // 2
        zoom = images[..., off : off + crop, off : off + crop]
        zoom = torch.nn.functional.interpolate(zoom, size=(size, size), mode="bilinear",
                                               align_corners=False)
        views.append(zoom)
        if n_views >= 4:
            views.append(torch.flip(zoom, dims=[3]))
    if n_views > 4:
        raise ValueError(f"n_views must be <= 4, got {n_views}")
    return views
