"""Embedding shards: one split's cache written as ``n`` contiguous row blocks, so the
embedding stage can fan out over workers (``ROADWORK_EMBEDDING_SHARDS``), and read back
as the one per-split cache every reader already takes.

Rows. Shard ``k`` of ``n`` holds the rows ``i`` of the split's manifest (``N`` rows) with
``floor(i n / N) = k``, i.e. the block ``[ceil(k N / n), ceil((k + 1) N / n))``: blocks
are contiguous and in order, so concatenating the shards in shard order gives back the
manifest's order (``logits_finite_and_aligned`` compares exactly that). With ``n > N``
some shards are empty; an empty shard is a valid (zero-row) cache and merges away.

Stamps. Each shard is ``compute_embeddings`` of its rows, plus ``n_shards``, ``shard``,
``row_start``, ``row_stop`` and ``n_rows`` (the manifest's length); it already carries
the manifest's ``data_version`` and the ``code_version`` that wrote it.
``read_embedding_shards`` refuses shards that disagree (another shard count, another
manifest version, other settings, other code, a gap in the rows): mixing them would pair
one version's features with another's labels. A shard stamped with another split than
the one asked for is refused too, whatever path it was found at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import ArtifactIntegrityError, BadInputError
from roadwork_assets.contracts.splits import shard_key
from roadwork_assets.core.artifacts import ArtifactRegistry
from roadwork_assets.core.data.array_cache import ConcatRows, append_npz, open_npz
from roadwork_assets.core.progress import Progress, no_progress
from roadwork_assets.core.training.config import TrainerConfig
from roadwork_assets.core.training.pipeline import compute_embeddings

SHARD_STAMPS = ("n_shards", "shard", "row_start", "row_stop", "n_rows")
# what every shard of one split must share: one shard count, one manifest, one setting, one
# code (a shard re-made from the UI after a code edit must not merge with the others)
SHARED_STAMPS = ("n_shards", "n_rows", "split", "data_version", "assignment_version", "kind",
                 "backbone", "img_size", "n_views", "weights_sha256", "code_version")
ROW_ARRAYS = ("labels", "item_ids", "group_keys", "sample_weight")  # one entry per row


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``shard`` of ``n_shards`` of a split."""

    n_shards: int
    shard: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n_shards, int) and self.n_shards >= 1):
            raise BadInputError(f"n_shards must be an int >= 1, got {self.n_shards!r}")
        if not (isinstance(self.shard, int) and 0 <= self.shard < self.n_shards):
            raise BadInputError(f"shard must be in 0..{self.n_shards - 1}, got {self.shard!r}")

    def bounds(self, n_rows: int) -> tuple[int, int]:
        """``(start, stop)``: the rows ``i`` of ``n_rows`` with ``i * n_shards // n_rows ==
        shard``, i.e. ``ceil(shard N / n)`` up to the next shard's start."""
        n = self.n_shards
        return (-(-self.shard * n_rows // n), -(-(self.shard + 1) * n_rows // n))


def compute_embedding_shard(manifest: pd.DataFrame, cfg: TrainerConfig, dest: Path, split: str,
                            shard: ShardSpec, data_version: str, assignment_version: str,
                            progress: Progress = no_progress) -> dict[str, Any]:
    """Write the cache of ``shard``'s rows of ``manifest`` (``compute_embeddings``) at
    ``dest`` (a staged path: the stamps are appended to it), stamped with its place in
    the split; return the summary with the shard and its rows."""
    start, stop = shard.bounds(len(manifest))
    summary = compute_embeddings(manifest.iloc[start:stop], cfg, dest, split, data_version,
                                 assignment_version, progress=progress)
    append_npz(dest, n_shards=np.array(shard.n_shards), shard=np.array(shard.shard),
               row_start=np.array(start), row_stop=np.array(stop),
               n_rows=np.array(len(manifest)))
    return {**summary, "n_shards": shard.n_shards, "shard": shard.shard,
            "rows": [start, stop], "n_rows": len(manifest)}


def _fix(split: str) -> str:
    return (f"re-materialize every shard of embeddings for split {split} with the current "
            "ROADWORK_EMBEDDING_SHARDS (`roadwork run` does it)")


def open_embedding_shard(path: Path, split: str, shard: int) -> dict[str, Any]:
    """One shard's cache: ``features`` memory-mapped, the rest in memory; a shard without
    its stamps (written before sharding, or by hand) is refused."""
    key = shard_key(split, shard)
    cache = open_npz(path, mapped=("features",), what=f"embeddings[{key}]",
                     fix=f"re-materialize embeddings partition {key} (`roadwork run` does it)")
    missing = [s for s in SHARD_STAMPS if s not in cache]
    if missing:
        raise ArtifactIntegrityError(
            f"embeddings[{key}] at {path} carries no shard stamps {missing} (written before "
            f"embeddings were sharded?): {_fix(split)}")
    if int(cache["shard"]) != shard:
        raise ArtifactIntegrityError(
            f"embeddings[{key}] at {path} is stamped shard {int(cache['shard'])}: {_fix(split)}")
    # the path names the split, but only the stamp says which rows went in: never hand a
    # reader of one split another split's rows (the split policy's last line of defence)
    stamped = str(cache["split"]) if "split" in cache else None
    if stamped != split:
        raise ArtifactIntegrityError(
            f"embeddings[{key}] at {path} is stamped split {stamped!r}, not {split!r}: "
            f"{_fix(split)}")
    return cache


def _check_shards(caches: list[dict[str, Any]], paths: Sequence[Path], split: str) -> None:
    """Refuse shards that are not one consistent, complete cut of one manifest."""
    first = caches[0]
    if int(first["n_shards"]) != len(caches):
        raise ArtifactIntegrityError(
            f"embeddings[{shard_key(split, 0)}] at {paths[0]} was made as one of "
            f"{int(first['n_shards'])} shards, but {len(caches)} are read (the definitions' "
            f"ROADWORK_EMBEDDING_SHARDS): {_fix(split)}")
    stop = 0
    for k, (cache, path) in enumerate(zip(caches, paths, strict=True)):
        key = shard_key(split, k)
        for stamp in SHARED_STAMPS:
            if str(cache.get(stamp)) != str(first.get(stamp)):
                raise ArtifactIntegrityError(
                    f"embeddings[{key}] at {path} has {stamp} {str(cache.get(stamp))!r} but "
                    f"shard 0 has {str(first.get(stamp))!r}: the shards come from different "
                    f"runs (another shard count, split_manifest version, setting or code "
                    f"version); {_fix(split)}")
        if set(cache) != set(first):
            raise ArtifactIntegrityError(
                f"embeddings[{key}] at {path} holds arrays {sorted(set(cache) ^ set(first))} "
                f"that shard 0 does not (or the reverse): {_fix(split)}")
        if int(cache["row_start"]) != stop or len(cache["labels"]) != (
                int(cache["row_stop"]) - int(cache["row_start"])):
            raise ArtifactIntegrityError(
                f"embeddings[{key}] at {path} holds rows {int(cache['row_start'])}.."
                f"{int(cache['row_stop'])} ({len(cache['labels'])} rows), not a block starting "
                f"at row {stop}: {_fix(split)}")
        stop = int(cache["row_stop"])
    if stop != int(first["n_rows"]):
        raise ArtifactIntegrityError(f"embeddings[{split}] shards cover {stop} of "
                                     f"{int(first['n_rows'])} rows: {_fix(split)}")


def merge_shards(caches: list[dict[str, Any]], paths: Sequence[Path], split: str) -> dict[str, Any]:
    """The per-split cache of its shards (checked): row arrays concatenated, ``features``
    one ``MappedRows`` per shard read as one (``ConcatRows``), never copied whole."""
    if not caches:
        raise ArtifactIntegrityError(f"embeddings[{split}]: no shard to read: {_fix(split)}")
    _check_shards(caches, paths, split)
    out = {k: v for k, v in caches[0].items() if k not in ("shard", "row_start", "row_stop")}
    for name in ROW_ARRAYS:
        if name in out:
            out[name] = np.concatenate([c[name] for c in caches])
    parts = [c["features"] for c in caches if len(c["features"])] or [caches[0]["features"]]
    out["features"] = parts[0] if len(parts) == 1 else ConcatRows(parts)
    return out


def read_embedding_shards(paths: Sequence[Path], split: str) -> dict[str, Any]:
    """The cache of ``split`` from its shards' files, in shard order (all of them)."""
    caches = [open_embedding_shard(Path(p), split, k) for k, p in enumerate(paths)]
    return merge_shards(caches, [Path(p) for p in paths], split)


def shard_paths(registry: ArtifactRegistry, split: str, n_shards: int | None = None) -> list[Path]:
    """The files of a split's shards; ``n_shards`` None: as many as shard 0 was made with."""
    if n_shards is None:
        n_shards = int(open_embedding_shard(registry.embedding_shard(split, 0), split, 0)["n_shards"])
    return [registry.embedding_shard(split, k) for k in range(n_shards)]


def read_split_embeddings(registry: ArtifactRegistry, split: str,
                          n_shards: int | None = None) -> dict[str, Any]:
    """A split's cache read straight from the registry (outside Dagster's IO manager)."""
    return read_embedding_shards(shard_paths(registry, split, n_shards), split)
