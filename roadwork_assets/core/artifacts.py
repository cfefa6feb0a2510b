"""The artifact registry: every artifact path under one root, and atomic writes.

Nothing else in the project builds an artifact path. Every write goes to a temporary
file in the destination directory, is flushed and fsynced, then renamed over the
destination (``os.replace`` is atomic on POSIX), so a reader sees either the old
complete file or the new complete file, never a half-written one — even if the
writer is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.splits import SPLITS

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


# --------------------------------------------------------------------------- writes
@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it over ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; artifacts on shared storage must be readable by workers
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.lru_cache(maxsize=4)
def _owner_token(pid: int) -> str:
    return f"{pid}-{secrets.token_hex(4)}"


def owner_token() -> str:
    """``PID-RANDOM``: names this process's staged files (stable within the process, new
    after a fork), so concurrent writers never share one and a dead owner can be told."""
    return _owner_token(os.getpid())


def staged_path(dest: Path) -> Path:
    """Where an artifact is written before its blocking checks pass (same directory).

    Unique per process (``.NAME.staged-PID-TOKEN.SUFFIX``): two runs never write one
    staged file, and ``collect_dead_leftovers`` can tell whose it is."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.staged-{owner_token()}{dest.suffix}")


# staged files, bundle staging folders and atomic-write temporaries, each naming its pid
_LEFTOVER = re.compile(r"^(?:\.staging-|\..*?(?:\.staged-|\.tmp-))(\d+)-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def collect_dead_leftovers(root: Path) -> list[Path]:
    """Remove staged files, bundle staging folders and write temporaries under ``root``
    whose owner process is gone (a killed run's); returns what was removed.

    Only names that carry a pid are touched, and only when that pid is dead on this
    host: a live writer's files, and anything else, stay."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            match = _LEFTOVER.match(name)
            if not match or pid_alive(int(match.group(1))):
                continue
            path = Path(dirpath) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
    return removed


def promote(staged: Path, dest: Path) -> Path:
    """Atomically replace ``dest`` with a fully written, checked staged artifact."""
    os.replace(staged, dest)
    _fsync_dir(Path(dest).parent)
    return Path(dest)


def reject(staged: Path, dest: Path) -> Path:
    """Keep a staged artifact that failed its checks beside ``dest`` for inspection;
    ``dest`` itself (the last good version) is left untouched."""
    rejected = Path(dest).with_name(f"{Path(dest).name}.rejected{Path(dest).suffix}")
    os.replace(staged, rejected)
    return rejected


def atomic_write_bytes(dest: Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: Path, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: Path, obj: BaseModel | dict[str, Any]) -> Path:
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=2)
    else:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(dest, text + "\n")


def atomic_write_parquet(
    dest: Path, frame: pd.DataFrame, provenance: dict[str, str] | None = None
) -> Path:
    """Write a table; ``provenance`` (data/code version) goes into the parquet footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if provenance:
        meta = dict(table.schema.metadata or {})
        meta[b"roadwork.provenance"] = json.dumps(provenance, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return Path(dest)


def read_parquet_provenance(path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"roadwork.provenance")
    return json.loads(raw) if raw else {}


def atomic_write_npz(dest: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(dest, buf.getvalue())


def atomic_torch_save(dest: Path, obj: Any) -> Path:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)
    return Path(dest)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Load an npz without pickle (object arrays are refused)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactIntegrityError(f"missing artifact {path}: materialize its asset first")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------- hashes
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def frame_fingerprint(frame: pd.DataFrame, columns: list[str] | None = None) -> str:
    """sha256 of a table's content, independent of the file format that stored it."""
    cols = columns or list(frame.columns)
    canon = frame[cols].sort_values(cols[0]).to_csv(index=False, lineterminator="\n")
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def combine_versions(parts: dict[str, str]) -> str:
    """One data version from several named inputs' versions (order-independent)."""
    text = "\n".join(f"{k}={v}" for k, v in sorted(parts.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's source files: which code produced an artifact.

    A git commit would need git and a checkout; the source hash works in a wheel or a
    container too and changes exactly when the code does.
    """
    h = hashlib.sha256()
    hash_source_tree(h, Path(__file__).resolve().parents[1])
    return h.hexdigest()[:16]


def hash_source_tree(h, root: Path) -> None:
    """Feed ``h`` every ``*.py`` under ``root`` (a package folder, or one module file):
    its path relative to ``root`` and its bytes, in sorted order."""
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    for path in files:
        h.update(path.relative_to(root if root.is_dir() else root.parent).as_posix().encode())
        h.update(path.read_bytes())


def settings_sha256(values: dict[str, Any]) -> str:
    """Short sha256 of one settings group (canonical JSON), as printed by `roadwork run`."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_record(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{group: {"sha256": ..., "values": {...}}}``: the settings an artifact was made
    with, each group hashed the way the `roadwork run` header prints it."""
    return {name: {"sha256": settings_sha256(values), "values": values}
            for name, values in sorted(groups.items())}


def make_provenance(data_version: str, checkpoint_sha256: str | None = None,
                    settings: dict[str, dict[str, Any]] | None = None):
    """Provenance stamp for a JSON artifact: data version, this code's version, now, and
    the settings (a ``settings_record``) that made it."""
    import datetime as dt

    from roadwork_assets.contracts.schemas import Provenance

    return Provenance(
        data_version=data_version,
        code_version=code_version(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        checkpoint_sha256=checkpoint_sha256,
        settings=settings,
    )


# --------------------------------------------------------------------------- registry
def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return split


@dataclass(frozen=True)
class ArtifactRegistry:
    """Names every artifact path under ``root``. Creating it creates nothing."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    # data
    @property
    def default_dataset_dir(self) -> Path:
        return self.root / "data" / "default"

    @property
    def source_cache_dir(self) -> Path:
        """Where readers put derived copies of source data (e.g. NATIX image bytes)."""
        return self.root / "data"

    @property
    def source_table(self) -> Path:
        return self.root / "source_images" / "images.parquet"

    @property
    def quarantine_table(self) -> Path:
        return self.root / "source_images" / "quarantine.parquet"

    @property
    def split_assignment(self) -> Path:
        return self.root / "split_assignment" / "assignment.parquet"

    def split_manifest(self, split: str) -> Path:
        return self.root / "split_manifest" / f"{_check_split(split)}.parquet"

    # model
    def embeddings_dir(self, split: str) -> Path:
        """The folder of one split's embedding shards (``shard_<k>.npz``)."""
        return self.root / "embeddings" / _check_split(split)

    def embedding_shard(self, split: str, shard: int) -> Path:
        """Shard ``shard`` of a split's embeddings cache (``core.training.shards``)."""
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
            raise ValueError(f"shard must be a non-negative int, got {shard!r}")
        return self.embeddings_dir(split) / f"shard_{shard}.npz"

    @property
    def adapted_backbone(self) -> Path:
        return self.root / "adapted_backbone" / "backbone.pt"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint" / "model.pt"

    def logits(self, split: str) -> Path:
        return self.root / "logits" / f"{_check_split(split)}.npz"

    @property
    def multiview_checkpoint(self) -> Path:
        return self.root / "multiview_checkpoint" / "aggregator.json"

    def multiview_views(self, split: str) -> Path:
        return self.root / "multiview_views" / f"{_check_split(split)}.npz"

    def multiview_logits(self, split: str) -> Path:
        return self.root / "multiview_logits" / f"{_check_split(split)}.npz"

    # policies
    def policy(self, name: str) -> Path:
        if name not in {"softmax", "gate", "scrc", "cascade"}:
            raise ValueError(f"unknown policy artifact {name!r}")
        return self.root / "policies" / f"{name}.json"

    # export
    @property
    def bundles_dir(self) -> Path:
        return self.root / "bundles"

    @property
    def latest_bundle_pointer(self) -> Path:
        return self.bundles_dir / "LATEST"

    def bundle_dir(self, bundle_id: str) -> Path:
        return self.bundles_dir / bundle_id

    def latest_bundle(self) -> Path:
        pointer = self.latest_bundle_pointer
        if not pointer.exists():
            raise ArtifactIntegrityError(
                f"no bundle under {self.bundles_dir}: materialize the `bundle` asset first"
            )
        bundle_id = pointer.read_text().strip()
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,128}", bundle_id):
            raise ArtifactIntegrityError(
                f"{pointer} names {bundle_id[:80]!r}, which is not a bundle id (a plain name "
                f"inside {self.bundles_dir}): re-materialize the `bundle` asset")
        return self.bundle_dir(bundle_id)

    # evaluation
    @property
    def test_report(self) -> Path:
        return self.root / "test_report" / "report.json"

    def test_report_plot(self, name: str) -> Path:
        return self.root / "test_report" / f"{name}.png"

    # tracking
    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> Path:
        # MLflow's default is ./mlruns of whatever folder the process started in
        return self.root / "mlflow" / "artifacts"


def publish_directory(staging: Path, dest: Path) -> None:
    """Move a fully written staging directory to ``dest`` (which must not exist)."""
    if dest.exists():
        raise ArtifactIntegrityError(f"refusing to overwrite existing directory {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, dest)
    _fsync_dir(dest.parent)


def remove_tree_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
