"""A cheap stamp of a data source on disk: has anything been added, removed or edited?

stamp = sha256 over (relative path, size, mtime_ns) of every file under the source
(a folder tree), or of the one file (a manifest, a parquet file). Reading every image
to fingerprint its pixels is what ``source_images`` does; this stamp only tells
whether doing that again could give anything new, so `roadwork run` can skip it.

It sees a file added, removed, resized or rewritten (mtime). It does not see the
images a CSV / parquet manifest points at outside its own folder change in place.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MISSING = "missing"


def source_stamp(*paths: Path | str) -> str:
    """Short sha256 of the listing (path, size, mtime_ns) of each of ``paths`` (several
    sources: in order); a path that does not exist counts as ``missing``."""
    h = hashlib.sha256()
    for n, path in enumerate(Path(p).expanduser() for p in paths):
        h.update(f"source {n}: {path.name}\n".encode())
        if not path.exists():
            h.update(MISSING.encode())
            continue
        for rel, st in _listing(path):
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _listing(path: Path) -> list[tuple[str, os.stat_result]]:
    if path.is_file():
        return [(path.name, path.stat())]
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            try:
                entries.append((full.relative_to(path).as_posix(), full.stat()))
            except FileNotFoundError:  # removed while we walked: it is not there
                continue
    return entries
