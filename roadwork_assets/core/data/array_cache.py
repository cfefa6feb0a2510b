"""Row arrays bigger than memory: written batch by batch, read back by memory map.

The per-split caches (decoded images, backbone features) grow with the dataset: 100k
images at 224 px are 15 GB. They are kept in an ordinary ``.npz`` (so ``np.load`` and
``read_npz`` still open them, and the artifact stays one file with one sha256, staged,
promoted and rejected like every other), with two properties that make them scale:

- written incrementally: :class:`StreamingNpz` streams each array into an *uncompressed*
  zip member (``zipfile`` rewrites the member's header with its CRC and size when it is
  closed), so only one batch is ever in memory; the whole file is written to a
  temporary next to the destination and renamed over it only when every row is in
  (``core.artifacts.atomic_path``): a killed writer leaves no half cache.
- read by memory map: an uncompressed member's ``.npy`` bytes lie contiguously in the
  file, so :func:`open_npz` maps them (``np.memmap`` at the member's data offset) and
  hands out a :class:`MappedRows`, whose indexing copies the rows asked for and then
  drops the mapped pages from this process (``madvise(MADV_DONTNEED)``; they stay in
  the OS page cache): a pass over a 15 GB cache keeps about one batch resident, not the
  file. (Mapped pages a process has touched count in its RSS until it unmaps or drops
  them; ``bench_memory.py --no-release`` shows the difference.)
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.core.artifacts import atomic_path

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)
# Drop the mapped pages after every read: one fault can map far more than the rows read
# (the kernel maps a whole large folio of the page cache, up to 2 MiB, plus fault-around),
# so rows scattered over the file (a shuffled epoch) map many MiB per batch. One madvise
# per batch costs microseconds next to the batch's forward pass.
_RELEASE_BYTES = 0


class RowWriter:
    """Sequential writer of one ``[N, ...]`` array member; ``write`` appends rows."""

    def __init__(self, stream: Any, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        self.rows = 0
        self._stream = stream
        npy_format.write_array_header_2_0(
            stream, {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": self.shape})

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.name}: rows of shape {rows.shape} do not fit "
                             f"{self.shape} after {self.rows} rows")
        self._stream.write(memoryview(rows).cast("B"))
        self.rows += len(rows)


class StreamingNpz:
    """An ``.npz`` being written: row arrays by batch (:meth:`rows`), small ones whole
    (:meth:`put`). Use through :func:`streaming_npz`."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf
        self._open: list[RowWriter] = []

    @contextmanager
    def rows(self, name: str, shape: tuple[int, ...], dtype: Any) -> Iterator[RowWriter]:
        """Stream member ``name``; every one of ``shape[0]`` rows must be written."""
        with self._zf.open(f"{name}.npy", mode="w", force_zip64=True) as stream:
            writer = RowWriter(stream, name, shape, dtype)
            yield writer
            if writer.rows != writer.shape[0]:
                raise ValueError(f"{name}: {writer.rows} of {writer.shape[0]} rows written")

    def put(self, **arrays: np.ndarray) -> None:
        """Write small arrays whole (no pickle, as ``np.savez``)."""
        for name, value in arrays.items():
            with self._zf.open(f"{name}.npy", mode="w", force_zip64=True) as stream:
                npy_format.write_array(stream, np.asanyarray(value), allow_pickle=False)


@contextmanager
def streaming_npz(dest: Path) -> Iterator[StreamingNpz]:
    """Write an uncompressed ``.npz`` at ``dest`` atomically: a temporary file in the same
    folder, renamed over ``dest`` only if the ``with`` body finishes."""
    with atomic_path(Path(dest)) as tmp, \
            zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        yield StreamingNpz(zf)


class MappedRows:
    """A read-only ``[N, ...]`` array on disk. Indexing returns an in-memory copy of the
    rows asked for (``x[a:b]``, ``x[index_array]``, ``x[:, 0]``...); ``np.asarray(x)``
    reads it whole (only for arrays known to be small)."""

    release_bytes = _RELEASE_BYTES  # copied-out bytes after which the mapped pages are dropped

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        empty = int(np.prod(self.shape)) == 0
        # np.memmap cannot map zero bytes: an empty split gets an empty array
        self._mm = np.zeros(self.shape, self.dtype) if empty else np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)
        self._copied = 0

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        if hasattr(key, "numpy"):  # a torch index tensor
            key = key.numpy()
        out = np.array(self._mm[key])
        self._copied += out.nbytes
        if self._copied >= self.release_bytes:
            self.release()
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self._mm, dtype=dtype)

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the OS page cache)."""
        self._copied = 0
        raw = getattr(self._mm, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)


def _member_data(fh: Any, info: zipfile.ZipInfo) -> tuple[int, int, tuple[int, ...], np.dtype]:
    """(file offset of the member's first byte, of the array's first byte, shape, dtype)
    of an uncompressed member."""
    fh.seek(info.header_offset)
    header = fh.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename} has no local header")
    name_len, extra_len = _LOCAL_HEADER.unpack(header)[-2:]
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    fh.seek(start)
    version = npy_format.read_magic(fh)
    read_header = {(1, 0): npy_format.read_array_header_1_0,
                   (2, 0): npy_format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"member {info.filename} has .npy format version {version}")
    shape, fortran, dtype = read_header(fh)
    if fortran or dtype.hasobject:
        raise ValueError(f"member {info.filename} is not a plain C-order array")
    return start, fh.tell(), shape, dtype


def open_npz(path: Path, mapped: tuple[str, ...], what: str, fix: str) -> dict[str, Any]:
    """Every array of the ``.npz`` at ``path``: the ``mapped`` ones as :class:`MappedRows`,
    the rest read whole. A missing, truncated or corrupt file raises
    :class:`ArtifactIntegrityError` naming ``what`` and saying ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactIntegrityError(f"{what} is missing at {path}: {fix}")
    try:
        with np.load(path, allow_pickle=False) as data:
            out: dict[str, Any] = {k: data[k] for k in data.files if k not in mapped}
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for name in mapped:
                info = zf.getinfo(f"{name}.npy")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"member {name} is compressed and cannot be memory-mapped")
                start, offset, shape, dtype = _member_data(fh, info)
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if offset + nbytes > size:
                    raise ValueError(f"member {name} runs past the end of the file")
                if info.file_size != offset - start + nbytes:
                    raise ValueError(f"member {name} holds {info.file_size} bytes, its header "
                                     f"declares {shape} {dtype}")
                out[name] = MappedRows(path, offset, shape, dtype)
    except ArtifactIntegrityError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as exc:
        raise ArtifactIntegrityError(
            f"{what} at {path} is truncated or corrupt ({type(exc).__name__}: {exc}): {fix}"
        ) from exc
    return out



class ConcatRows:
    """Several row arrays (``MappedRows`` or ndarrays with one row shape) read as one:
    ``x[index_array]`` gathers the rows from whichever part holds them, never
    concatenating the parts in memory. A tuple key (``x[:, 0]``) takes its first item
    as the rows and applies the rest (ints and slices) to each row."""

    def __init__(self, parts: list[Any]) -> None:
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts have different row shapes {sorted(shapes)}")
        self._parts = parts
        self._ends = np.cumsum([len(p) for p in parts])
        self.shape = (int(self._ends[-1]), *shapes.pop())
        self.ndim = len(self.shape)
        self.dtype = np.result_type(*[p.dtype for p in parts])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        if hasattr(key, "numpy"):
            key = key.numpy()
        rows, rest = (key[0], tuple(key[1:])) if isinstance(key, tuple) else (key, ())
        idx = np.arange(len(self))[rows]
        one_row = np.ndim(idx) == 0
        idx = np.atleast_1d(idx)
        row_shape = np.empty(self.shape[1:], dtype=bool)[rest].shape
        out = np.empty((*np.shape(idx), *row_shape), dtype=self.dtype)
        part_of = np.searchsorted(self._ends, idx, side="right")
        for p, part in enumerate(self._parts):
            hit = np.flatnonzero(part_of == p)
            if len(hit):
                start = self._ends[p] - len(part)
                out[hit] = part[(idx[hit] - start, *rest)]
        return out[0] if one_row else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row in memory (only for arrays known to be small, as ``MappedRows``)."""
        return np.concatenate([np.asarray(p) for p in self._parts]).astype(
            dtype or self.dtype, copy=False)


def append_npz(path: Path, **arrays: np.ndarray) -> None:
    """Add small arrays to an existing uncompressed ``.npz`` (a zip append: the members
    already there keep their offsets, so memory maps of them stay valid). Not atomic:
    for a staged file that is promoted only after it is complete."""
    with zipfile.ZipFile(path, mode="a", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as zf:
        clash = sorted(set(f"{name}.npy" for name in arrays) & set(zf.namelist()))
        if clash:
            raise ValueError(f"{path} already holds {clash}")
        StreamingNpz(zf).put(**arrays)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
