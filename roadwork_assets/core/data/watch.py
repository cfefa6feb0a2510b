"""What a data source holds now, in a few numbers: how a new-data sensor tells that
``ROADWORK_DATA`` gained files or rows without reading a single image.

A snapshot is (layout, n_files, n_rows, digest). With several sources in
``ROADWORK_DATA`` (:func:`snapshot_sources`) the counts are summed and the digest covers
every source's name and digest, so a change in any one of them is a change. The digest is the sha256 of the sorted
entries, each entry one file of the source:

- class folders (``roadwork/``, ``none/``): every visible image file, as
  (path relative to the root, size in bytes, mtime in ns); one row per file;
- a CSV manifest: the manifest itself, by content (sha256) and row count: manifests are
  small, and a rewrite that changes nothing is not new data;
- a parquet manifest, or a NATIX parquet file or folder: every visible ``.parquet`` file
  as (relative path, size, mtime in ns, row count from the parquet footer).

Images are stat-ed, not hashed: a sensor ticks every 30 s and hashing a large dataset
each time would cost minutes; a touched file counts as changed (a false alarm costs one
retraining run, a missed image costs a stale model).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.artifacts import file_sha256
from roadwork_assets.core.data.multi_source import parse_source_specs
from roadwork_assets.core.data.sources import CLASS_FOLDERS, IMAGE_EXTENSIONS


class SourceSnapshot(BaseModel):
    """The few numbers a sensor cursor keeps about a source."""

    model_config = ConfigDict(frozen=True)

    layout: str
    n_files: int
    n_rows: int
    digest: str

    def to_cursor(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_cursor(cls, cursor: str | None) -> SourceSnapshot | None:
        """None for no cursor or one another version wrote (it is re-recorded)."""
        if not cursor:
            return None
        try:
            return cls.model_validate_json(cursor)
        except ValueError:
            return None

    def change_from(self, previous: SourceSnapshot | None) -> str | None:
        """A sentence saying what changed since ``previous``; None when nothing did."""
        if previous is None or previous.digest == self.digest:
            return None
        parts = []
        for what, now, before in (("file", self.n_files, previous.n_files),
                                  ("row", self.n_rows, previous.n_rows)):
            if now != before:
                parts.append(f"{now - before:+d} {what}s ({before} -> {now})")
        if not parts:
            parts.append(f"same counts ({self.n_files} files, {self.n_rows} rows), "
                         "content changed")
        return ", ".join(parts)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _digest(entries: list[tuple]) -> str:
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _class_folders(root: Path) -> SourceSnapshot:
    entries = []
    for name in CLASS_FOLDERS:
        folder = root / name
        if not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            if (path.suffix.lower() in IMAGE_EXTENSIONS and _visible(path, root)
                    and path.is_file()):
                st = path.stat()
                entries.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return SourceSnapshot(layout="class folders", n_files=len(entries), n_rows=len(entries),
                          digest=_digest(entries))


def _parquet(files: list[Path], root: Path, layout: str) -> SourceSnapshot:
    entries = []
    for path in files:
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise BadInputError(f"cannot read parquet file {str(path)!r}: {exc}; fix or "
                                "remove it") from exc
        st = path.stat()
        entries.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns, rows))
    return SourceSnapshot(layout=layout, n_files=len(entries),
                          n_rows=sum(e[3] for e in entries), digest=_digest(entries))


def _csv(path: Path) -> SourceSnapshot:
    try:
        rows = len(pd.read_csv(path, usecols=[0]))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot read manifest {str(path)!r}: {exc}") from exc
    return SourceSnapshot(layout="csv manifest", n_files=1, n_rows=rows,
                          digest=_digest([(path.name, file_sha256(path), rows)]))


def snapshot_source(spec: str | Path) -> SourceSnapshot:
    """The snapshot of a source in any layout ``core.data.sources.load_source`` reads."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise BadInputError(f"data source {str(path)!r} does not exist: set ROADWORK_DATA "
                            "(or the dataset resource's spec) to an existing folder or file")
    if path.is_dir():
        if any((path / name).is_dir() for name in CLASS_FOLDERS):
            return _class_folders(path)
        files = sorted(p for p in path.rglob("*.parquet") if _visible(p, path) and p.is_file())
        if files:
            return _parquet(files, path, "parquet folder")
        raise BadInputError(f"folder {str(path)!r} has neither roadwork/ nor none/ subfolders "
                            "nor .parquet files: nothing to watch")
    if path.suffix.lower() == ".csv":
        return _csv(path)
    if path.suffix.lower() == ".parquet":
        return _parquet([path], path.parent, "parquet file")
    raise BadInputError(f"data source {str(path)!r} is not a folder, .csv or .parquet file")


def snapshot_sources(spec: str | Path) -> SourceSnapshot:
    """The snapshot of everything ``ROADWORK_DATA`` names (``core.data.sources``'s
    ``parse_source_specs``: one path, or several joined by ``os.pathsep``, each optionally
    ``name=path``). One source gives exactly :func:`snapshot_source`'s snapshot, so a
    cursor recorded before a second source was added still compares."""
    specs = parse_source_specs(spec)
    if not specs:
        raise BadInputError("ROADWORK_DATA names no source: nothing to watch")
    if len(specs) == 1:
        return snapshot_source(specs[0].path)
    parts = []
    for s in specs:
        try:
            parts.append((s.name, snapshot_source(s.path)))
        except BadInputError as exc:
            raise BadInputError(f"source {s.name!r} of ROADWORK_DATA: {exc}") from exc
    return SourceSnapshot(
        layout=" + ".join(f"{name}: {snap.layout}" for name, snap in parts),
        n_files=sum(snap.n_files for _, snap in parts),
        n_rows=sum(snap.n_rows for _, snap in parts),
        digest=_digest([(name, snap.digest) for name, snap in parts]))
