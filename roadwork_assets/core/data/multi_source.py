"""Several sources in ``ROADWORK_DATA`` read as one table of records.

Several sources at once (:func:`load_sources`): ``ROADWORK_DATA`` may name several
sources separated by ``os.pathsep`` (``:`` on Linux/macOS, ``;`` on Windows), each
optionally named ``name=path`` (default name: the path's last component without its
suffix). :func:`parse_source_specs` is the one parser (pure string work, no I/O);
:func:`load_sources` reads each source with :func:`load_source` and concatenates them
with a ``source`` column (the name). The first source's group ids and item ids stay
as written; every later source's group ids are namespaced ``<source>/<group_id>`` (two
datasets' ``seq_01`` are different scenes; copies of one photo across sources are still
merged by content, see ``core.data.splits``), and a later source's item id that another
source also has is prefixed ``<source>:``. Keeping the first source as written is what
lets a second source be added without changing the first one's group ids, which would
re-split from scratch (``core.data.splits._consistent_previous``). One source reads
exactly as before, plus the ``source`` column.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.sources import LAYOUTS_HELP, finish_records, load_source, source_quarantine

__all__ = ["SOURCE_COLUMN", "SourceSpec", "load_sources", "parse_source_specs"]

SOURCE_COLUMN = "source"  # added by load_sources: the name of the source a record came from

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``ROADWORK_DATA``: a source's name and its path (as written)."""

    name: str
    path: str


def _default_name(path: str) -> str:
    stem = Path(path.rstrip("/\\")).name
    stem = Path(stem).stem if Path(stem).suffix.lower() in (".csv", ".parquet") else stem
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-") or "source"
    return cleaned[:64]


def parse_source_specs(spec: str | Path | Sequence[str] | None) -> list[SourceSpec]:
    """``ROADWORK_DATA``'s value as a list of named sources, in the order written.

    ``spec`` is one path, or several joined by ``os.pathsep``, or a list of entries;
    an entry is ``path`` or ``name=path`` (name: letters, digits, ``_ . -``, at most 64
    characters, starting with a letter or digit). Empty entries (a trailing separator)
    are ignored. Two entries with one name are refused with the fix (name them). No
    file is touched: this is what a sensor uses to list the sources it watches.
    ``None`` -> ``[]`` (the caller's generated default dataset).
    """
    if spec is None:
        return []
    entries = [str(spec)] if isinstance(spec, (str, Path)) else [str(e) for e in spec]
    parts = [p.strip() for e in entries for p in e.split(os.pathsep) if p.strip()]
    out: list[SourceSpec] = []
    for part in parts:
        name, sep, rest = part.partition("=")
        # "name=path" only when the left side is a valid name and the whole entry is not
        # itself an existing path (a folder may contain "=" in its name)
        if sep and rest and _SOURCE_NAME.match(name) and not Path(part).expanduser().exists():
            out.append(SourceSpec(name, rest.strip()))
        else:
            out.append(SourceSpec(_default_name(part), part))
    names = [s.name for s in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        same = [s.path for s in out if s.name in repeated]
        raise BadInputError(
            f"ROADWORK_DATA names {len(out)} sources but {', '.join(map(repr, repeated))} "
            f"is the name of more than one ({', '.join(same)}): give each its own name "
            f"with name=path, e.g. a={same[0]}{os.pathsep}b={same[1]}")
    return out


def load_sources(spec: str | Path | Sequence[str] | Sequence[SourceSpec], cache_dir: Path | str
                 ) -> pd.DataFrame:
    """Read every source of ``spec`` (see :func:`parse_source_specs`) into one table.

    The records of :func:`load_source` plus ``source`` (the source's name). A source
    that does not exist is refused naming it (and which entry of ``ROADWORK_DATA`` it
    is), before anything is read. Quarantined rows of every source are carried, their
    item ids made unique the same way as the records'.
    """
    specs = (list(spec) if isinstance(spec, (list, tuple)) and spec
             and isinstance(spec[0], SourceSpec) else parse_source_specs(spec))
    if not specs:
        raise BadInputError("ROADWORK_DATA names no source: set it to a folder, manifest or "
                            "NATIX parquet (several separated by " + repr(os.pathsep) + ")")
    for k, s in enumerate(specs):
        if not Path(s.path).expanduser().exists():
            raise BadInputError(
                f"source {s.name!r} (entry {k + 1} of {len(specs)} in ROADWORK_DATA) does not "
                f"exist: {str(Path(s.path).expanduser())!r}. Fix the path or remove the entry. "
                + LAYOUTS_HELP)
    frames, quarantines = [], []
    for s in specs:
        records = load_source(s.path, cache_dir)
        q = source_quarantine(records)
        q.insert(0, SOURCE_COLUMN, s.name)
        quarantines.append(q)
        records = records.copy()
        records[SOURCE_COLUMN] = s.name
        if s is not specs[0]:
            has = records["group_id"].notna()
            records.loc[has, "group_id"] = s.name + "/" + records.loc[has, "group_id"].astype(str)
        frames.append(records)
    out = pd.concat(frames, ignore_index=True)
    quarantine = pd.concat(quarantines, ignore_index=True)
    clash = _colliding_ids(pd.concat([out[["item_id", SOURCE_COLUMN]],
                                      quarantine[["item_id", SOURCE_COLUMN]]]))
    for frame in (out, quarantine):
        hit = frame["item_id"].isin(clash) & (frame[SOURCE_COLUMN] != specs[0].name)
        frame.loc[hit, "item_id"] = frame.loc[hit, SOURCE_COLUMN] + ":" + frame.loc[hit, "item_id"]
    finish_records(out, "the sources of ROADWORK_DATA")  # refuses ids still repeated
    out["label"] = out["label"].astype(np.int8)
    out.attrs["quarantine"] = quarantine[["item_id", "uri", "reason"]].to_dict("records")
    return out


def _colliding_ids(ids: pd.DataFrame) -> set[str]:
    """Item ids that occur in more than one source."""
    per_id = ids.drop_duplicates().groupby("item_id")[SOURCE_COLUMN].nunique()
    return set(per_id.index[per_id > 1])
