"""Read a user's image source into one canonical table of records.

Every reader returns a DataFrame with the columns of :data:`RECORD_COLUMNS`:

- ``item_id``  str, unique, human readable (``roadwork/a.jpg``, ``train-0.parquet#row12``)
- ``uri``      str, absolute path of an image file on disk
- ``label``    int8, 1 = roadwork, 0 = none
- ``group_id`` str or None: items sharing a group (scene, sequence) must share a split

Three layouts are accepted (see :func:`load_source`): class folders, a CSV/parquet
manifest, and NATIX parquet files with embedded image bytes. Folder scans (class
folders, a folder of NATIX files) skip hidden entries -- any file or folder under the
root whose name starts with ``.`` (editor, sync and partial-download leftovers such as
``.part-1.parquet``); paths a manifest lists are the user's explicit choice and are read
even when hidden. Rows a reader sets aside
(e.g. NATIX roadwork rows without a scene description) are listed, never dropped
silently: ``df.attrs["quarantine"]`` holds a list of ``{"item_id", "uri", "reason"}``
dicts (plain dicts, so pandas can copy and compare attrs), read with
:func:`source_quarantine`; :func:`~roadwork_assets.core.data.ingest.ingest_images`
carries them into its quarantine table.
Several sources at once: :mod:`roadwork_assets.core.data.multi_source`.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from roadwork_assets.contracts.errors import BadInputError

__all__ = [
    "GROUP_COLUMNS",
    "IMAGE_EXTENSIONS",
    "RECORD_COLUMNS",
    "load_source",
    "parse_labels",
    "read_class_folders",
    "read_manifest",
    "read_natix_parquet",
    "source_quarantine",
    "store_bytes",
]

RECORD_COLUMNS = ("item_id", "uri", "label", "group_id")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
GROUP_COLUMNS = ("group_id", "scene_id", "sequence_id")  # first present wins
CLASS_FOLDERS = {"roadwork": 1, "none": 0}
NATIX_REQUIRED = ("label", "scene_description", "id")
_MAX_LISTED = 10
LAYOUTS_HELP = (
    "Accepted sources: (1) a folder with subfolders roadwork/ and/or none/ holding "
    "images; (2) a .csv or .parquet manifest with columns path, label and optionally "
    "group_id (or scene_id / sequence_id), paths relative to the manifest's folder; "
    "(3) a NATIX parquet file, or a folder of them, with an image struct column "
    "(holding 'bytes') plus label, scene_description and id. Hidden files and folders "
    "(name starting with '.') inside a source folder are skipped."
)


# --------------------------------------------------------------------------- labels

_TRUE_STRINGS = {"1", "true"}
_FALSE_STRINGS = {"0", "false"}
_NUMERIC_STRING = re.compile(r"^[01](\.0*)?$")


def parse_labels(
    values: Iterable[object], items: Sequence[str], *, where: str = "the source"
) -> np.ndarray:
    """Turn raw label values into an int8 array of 0/1, refusing anything else.

    Accepted (exactly 0 or 1, whatever the container wrote): ints 0/1, floats 0.0/1.0,
    bools, strings ``"0"``/``"1"``/``"0.0"``/``"1.0"`` and ``"true"``/``"false"`` (any
    case; the text form of a bool column written to CSV). Refused: anything else --
    ``"yes"``, ``"roadwork"``, ``2``, ``-1``, ``0.5``, NaN, None, empty. Labels are
    ground truth and are never guessed: the error lists up to 10 item ids with their
    values and asks for a fix at the source.
    """
    raw = list(values)
    if len(raw) != len(items):
        raise ValueError(f"parse_labels: {len(raw)} values for {len(items)} items")
    out = np.empty(len(raw), dtype=np.int8)
    bad: list[tuple[str, object]] = []
    for i, value in enumerate(raw):
        parsed = _parse_one_label(value)
        if parsed is None:
            bad.append((str(items[i]), value))
        else:
            out[i] = parsed
    if bad:
        listed = ", ".join(f"{item!r}: {value!r}" for item, value in bad[:_MAX_LISTED])
        more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        raise BadInputError(
            f"{len(bad)} label(s) in {where} are not 0/1: {listed}{more}. Labels are "
            "ground truth and are never guessed: set each to 0 (none) or 1 (roadwork), "
            "or remove the row."
        )
    return out


def _parse_one_label(value: object) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, Integral):
        return int(value) if int(value) in (0, 1) else None
    if isinstance(value, Real):
        as_float = float(value)
        if math.isnan(as_float):
            return None
        return int(as_float) if as_float in (0.0, 1.0) else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_STRINGS or text in _FALSE_STRINGS:
            return 1 if text in _TRUE_STRINGS else 0
        if _NUMERIC_STRING.match(text):
            return int(float(text))
    return None  # None, pd.NA, bytes, lists...


# --------------------------------------------------------------------------- helpers


def finish_records(records: pd.DataFrame, where: str, quarantine: list[dict] | None = None) -> pd.DataFrame:
    duplicated = records["item_id"][records["item_id"].duplicated(keep=False)]
    if len(duplicated):
        names = sorted(set(duplicated))
        listed = ", ".join(repr(n) for n in names[:_MAX_LISTED])
        more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
        raise BadInputError(
            f"{len(names)} item id(s) occur more than once in {where}: {listed}{more}. "
            "Every item must be listed once: remove the repeated rows."
        )
    out = pd.DataFrame(
        {
            "item_id": records["item_id"].astype(str).to_numpy(dtype=object),
            "uri": records["uri"].astype(str).to_numpy(dtype=object),
            "label": records["label"].to_numpy(dtype=np.int8),
            "group_id": records["group_id"].to_numpy(dtype=object),
        }
    )
    out.attrs["quarantine"] = list(quarantine or [])
    return out


def _is_hidden(path: Path, root: Path) -> bool:
    """Whether any part of ``path`` below ``root`` starts with a dot."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _listed(names: Sequence[str], total: int | None = None) -> str:
    """The first names, comma-separated, then "(and N more)" up to ``total`` (default:
    all of ``names``)."""
    total = len(names) if total is None else total
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (and {total - _MAX_LISTED} more)" if total > _MAX_LISTED else "")


def source_quarantine(records: pd.DataFrame) -> pd.DataFrame:
    """Rows a reader set aside, as a DataFrame (``item_id``, ``uri``, ``reason``)."""
    rows = records.attrs.get("quarantine", [])
    return pd.DataFrame(rows, columns=["item_id", "uri", "reason"])


def _text_or_none(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _missing_columns_error(missing: Sequence[str], where: str, present: Sequence[str], hint: str) -> BadInputError:
    return BadInputError(
        f"{where} lacks column(s) {', '.join(missing)}; columns present: "
        f"{', '.join(present) or '(none)'}. {hint}"
    )


# ---------------------------------------------------------------------- class folders


def read_class_folders(root: Path | str) -> pd.DataFrame:
    """``root/roadwork/**`` -> label 1, ``root/none/**`` -> label 0.

    Images are files with extension jpg/jpeg/png/webp/bmp (any case); other files, and
    hidden files and folders (name starting with ``.``), are ignored. A subfolder inside a class folder is a group (a scene or
    sequence): its name, e.g. ``seq_01``, becomes ``group_id`` so the same sequence is
    grouped across both classes and never straddles splits.
    """
    root = Path(root).expanduser().resolve()
    present = [name for name in CLASS_FOLDERS if (root / name).is_dir()]
    if not present:
        raise BadInputError(
            f"{str(root)!r} has neither a roadwork/ nor a none/ subfolder. Expected "
            "layout: <root>/roadwork/*.jpg (label 1) and <root>/none/*.jpg (label 0)."
        )
    rows = []
    for name in present:
        class_dir = root / name
        for path in sorted(class_dir.rglob("*")):
            rel = path.relative_to(class_dir)
            if _is_hidden(path, class_dir):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            group = rel.parent.as_posix() if len(rel.parts) > 1 else None
            rows.append((path.relative_to(root).as_posix(), str(path), CLASS_FOLDERS[name], group))
    if not rows:
        raise BadInputError(
            f"no images (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}, hidden files "
            f"skipped) found under {', '.join(str(root / n) for n in present)}: put the "
            "images there."
        )
    return finish_records(pd.DataFrame(rows, columns=list(RECORD_COLUMNS)), str(root))


# --------------------------------------------------------------------------- manifest


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            # Everything as text: pandas would otherwise turn a label column with one
            # blank into floats and hide the blank as NaN -> refused by parse_labels anyway,
            # but as text the user sees exactly what the file says.
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise BadInputError(f"cannot read table {str(path)!r}: {exc}") from exc


def read_manifest(path: Path | str) -> pd.DataFrame:
    """A CSV or parquet table with ``path``, ``label`` and optionally a group column.

    ``path`` is relative to the manifest's folder or absolute; the group column is the
    first present of ``group_id``, ``scene_id``, ``sequence_id``. ``item_id`` is the
    normalised path as written (``./a.jpg`` and ``a.jpg`` are the same item).
    """
    path = Path(path).expanduser().resolve()
    table = _read_table(path)
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise _missing_columns_error(
            [repr(m) for m in missing], f"manifest {str(path)!r}", [repr(str(c)) for c in table.columns],
            "A manifest needs 'path' (image file, relative to the manifest) and 'label' (0/1).",
        )
    if len(table) == 0:
        raise BadInputError(
            f"manifest {str(path)!r} lists no images (it has columns but no rows): add one "
            "row per image with its path and label."
        )
    # Whole-column checks first: a repeated or empty path is found in one vectorised
    # pass, before any per-row work (5 M rows repeating one path used to take minutes).
    column = table["path"].astype(str).str.strip()
    empty = np.flatnonzero(column.isin(["", "nan", "None"]).to_numpy())
    if len(empty):
        raise BadInputError(
            f"manifest {str(path)!r} has {len(empty)} empty 'path' value(s), at "
            f"{_listed([f'row {i}' for i in empty[:_MAX_LISTED]], len(empty))}: "
            "fill them in or remove those rows."
        )
    _refuse_repeated_paths(column, path)
    raw_paths = column.tolist()
    item_ids = [posixpath.normpath(p.replace("\\", "/")) for p in raw_paths]
    labels = parse_labels(table["label"], item_ids, where=f"manifest {str(path)!r}")
    group_column = next((c for c in GROUP_COLUMNS if c in table.columns), None)
    groups = [_text_or_none(v) for v in table[group_column]] if group_column else [None] * len(table)
    base = path.parent
    uris = [str(p if (p := Path(raw)).is_absolute() else (base / p).resolve()) for raw in raw_paths]
    records = pd.DataFrame({"item_id": item_ids, "uri": uris, "label": labels, "group_id": groups})
    return finish_records(records, f"manifest {str(path)!r}")


def _refuse_repeated_paths(column: pd.Series, path: Path) -> None:
    """Refuse a manifest whose ``path`` column repeats a value, naming the first ones."""
    repeated = column.duplicated(keep=False).to_numpy()
    if not repeated.any():
        return
    values = column.to_numpy()
    names = pd.unique(values[repeated])
    examples = []
    for name in names[:_MAX_LISTED]:
        rows = np.flatnonzero(values == name)
        more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
        examples.append(f"{name!r} (rows {', '.join(str(r) for r in rows[:3])}{more})")
    more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    raise BadInputError(
        f"{len(names)} item id(s) occur more than once in manifest {str(path)!r}: "
        f"{'; '.join(examples)}{more}. Every item must be listed once: remove the "
        "repeated rows."
    )


# ------------------------------------------------------------------------------ NATIX


def _visible_parquet(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.parquet") if not _is_hidden(p, folder) and p.is_file())


def _parquet_files(path_or_dir: Path) -> list[Path]:
    if path_or_dir.is_dir():
        files = _visible_parquet(path_or_dir)
        if not files:
            raise BadInputError(
                f"folder {str(path_or_dir)!r} holds no .parquet files (hidden ones skipped). {LAYOUTS_HELP}"
            )
        return files
    if not path_or_dir.is_file():
        raise BadInputError(f"{str(path_or_dir)!r} does not exist.")
    return [path_or_dir]


def _holds_bytes(field: pa.Field) -> bool:
    return pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0


def _image_column(schema: pa.Schema) -> str | None:
    """The first struct column with a ``bytes`` field, preferring a name containing
    "image" (an ``image_id`` string column before the ``image`` struct is not it)."""
    holding = [f.name for f in schema if _holds_bytes(f)]
    named = [name for name in holding if "image" in name.lower()]
    return (named or holding or [None])[0]


def _natix_columns(file: Path) -> str:
    """Validate a NATIX file's schema; return its image column's name."""
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise BadInputError(f"cannot read parquet file {str(file)!r}: {exc}") from exc
    present = [f"{f.name!r} ({f.type})" for f in schema]
    image_col = _image_column(schema)
    named = [f for f in schema if "image" in f.name.lower()]
    if image_col is None and named:
        raise BadInputError(
            f"NATIX parquet {str(file)!r}: image column {named[0].name!r} has type "
            f"{named[0].type}, expected a struct with a 'bytes' field (columns present: "
            f"{', '.join(present)})."
        )
    missing = [repr(c) for c in NATIX_REQUIRED if c not in schema.names]
    if image_col is None:
        missing.insert(0, "an image column (a struct column with a 'bytes' field)")
    if missing:
        raise _missing_columns_error(
            missing, f"NATIX parquet {str(file)!r}", present,
            "Expected an image struct column (with 'bytes'), label, scene_description, id.",
        )
    return image_col


_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"GIF8", "gif"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


def _extension(data: bytes, declared_path: str | None) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    suffix = Path(declared_path or "").suffix.lower().lstrip(".")
    return suffix if re.fullmatch(r"[a-z0-9]{1,5}", suffix) else "bin"


def store_bytes(data: bytes, store_dir: Path, declared_path: str | None = None) -> Path:
    """Write ``data`` to ``store_dir/<sha[:2]>/<sha>.<ext>`` atomically; reuse if present."""
    digest = hashlib.sha256(data).hexdigest()
    target = store_dir / digest[:2] / f"{digest}.{_extension(data, declared_path)}"
    if target.is_file() and target.stat().st_size == len(data):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_natix_parquet(path_or_dir: Path | str, extract_dir: Path | str) -> pd.DataFrame:
    """Read NATIX parquet file(s) and extract their image bytes to a content store.

    ``item_id`` is ``<file relative to the folder>#row<N>`` (N counts rows in that
    file). Labels are validated for every file before any image is written. A row is
    quarantined (listed in ``attrs["quarantine"]``, not returned) when its label is 1
    and ``scene_description`` is empty (NATIX's own rule: such rows are unverified), or
    when it has no image bytes. ``group_id`` is None (NATIX has no scene column). The
    image column is the first struct column with a ``bytes`` field (one whose name
    contains "image" first); ``id`` must be unique across the files (nulls aside), and
    hidden files in a folder are skipped.
    """
    source = Path(path_or_dir).expanduser().resolve()
    store = Path(extract_dir).expanduser().resolve()
    files = _parquet_files(source)
    base = source if source.is_dir() else source.parent
    image_cols = {file: _natix_columns(file) for file in files}

    # Pass 1, cheap columns only: refuse bad labels before writing gigabytes of images.
    keep: dict[Path, np.ndarray] = {}
    labels_of: dict[Path, np.ndarray] = {}
    quarantine: list[dict] = []
    natix_ids = []
    for file in files:
        meta = pq.read_table(file, columns=["label", "scene_description", "id"]).to_pandas()
        ids = [f"{file.relative_to(base).as_posix()}#row{i}" for i in range(len(meta))]
        natix_ids.append(pd.DataFrame({"id": meta["id"].to_numpy(dtype=object), "row": ids}))
        labels = parse_labels(meta["label"], ids, where=f"NATIX parquet {str(file)!r}")
        described = np.array([_text_or_none(v) is not None for v in meta["scene_description"]], dtype=bool)
        undescribed = (labels == 1) & ~described
        for i in np.flatnonzero(undescribed):
            quarantine.append({
                "item_id": ids[i], "uri": f"{file}#row{i}",
                "reason": "label 1 (roadwork) with an empty scene_description: NATIX uses "
                          "roadwork rows only when they are described",
            })
        keep[file], labels_of[file] = ~undescribed, labels
    _refuse_repeated_natix_ids(pd.concat(natix_ids, ignore_index=True), source)
    total_rows = sum(len(k) for k in keep.values())
    if total_rows == 0:
        raise BadInputError(
            f"NATIX source {str(source)!r} holds no rows ({len(files)} parquet file(s), all "
            "empty): point it at the files that hold the images."
        )

    # Pass 2, batch by batch: the image column is most of the file.
    rows = []
    for file in files:
        rel, row = file.relative_to(base).as_posix(), 0
        parquet = pq.ParquetFile(file)
        for batch in parquet.iter_batches(batch_size=64, columns=[image_cols[file]]):
            for cell in batch.column(0).to_pylist():
                item_id = f"{rel}#row{row}"
                data = (cell or {}).get("bytes")
                if not keep[file][row]:
                    pass
                elif not data:
                    quarantine.append({"item_id": item_id, "uri": f"{file}#row{row}",
                                       "reason": "no image bytes in the image column"})
                else:
                    uri = store_bytes(data, store, (cell or {}).get("path"))
                    rows.append((item_id, str(uri), labels_of[file][row], None))
                row += 1
    if not rows:
        first = quarantine[0]
        raise BadInputError(
            f"NATIX source {str(source)!r} yielded no usable rows: "
            + ("its only row was" if total_rows == 1 else f"all {total_rows} rows were")
            + f" set aside (e.g. {first['item_id']}: {first['reason']})."
        )
    return finish_records(pd.DataFrame(rows, columns=list(RECORD_COLUMNS)), f"NATIX source {str(source)!r}", quarantine)


def _refuse_repeated_natix_ids(ids: pd.DataFrame, source: Path) -> None:
    """NATIX ``id`` names one photo: two rows with one id are one item listed twice."""
    ids = ids[ids["id"].notna()]
    key = ids["id"].astype(str)
    repeated = key.duplicated(keep=False)
    if not repeated.any():
        return
    groups = ids[repeated.to_numpy()].groupby(key[repeated], sort=False)["row"]
    examples = [
        f"{name!r} ({len(rows)} rows: {', '.join(rows.iloc[:3])}"
        + (f" and {len(rows) - 3} more)" if len(rows) > 3 else ")")
        for name, rows in list(groups)[:_MAX_LISTED]
    ]
    n = groups.ngroups
    more = f" (and {n - _MAX_LISTED} more)" if n > _MAX_LISTED else ""
    raise BadInputError(
        f"{n} NATIX id(s) occur in more than one row of {str(source)!r}: "
        f"{'; '.join(examples)}{more}. Every photo must be listed once: remove the "
        "repeated rows (or give each photo its own id)."
    )


# --------------------------------------------------------------------------- dispatch


def load_source(spec: str | Path | None, cache_dir: Path | str) -> pd.DataFrame:
    """Read ``spec`` with the reader its layout calls for.

    ``None`` is the caller's business (it picks the generated default dataset) and
    raises ``ValueError``. NATIX images are extracted under ``cache_dir/natix_images``.
    """
    if spec is None:
        raise ValueError("load_source: no source given; the caller chooses the default dataset")
    path = Path(spec).expanduser().resolve()
    extract_dir = Path(cache_dir) / "natix_images"
    if not path.exists():
        raise BadInputError(f"source {str(path)!r} does not exist. {LAYOUTS_HELP}")
    if path.is_dir():
        if any((path / name).is_dir() for name in CLASS_FOLDERS):
            return read_class_folders(path)
        files = _visible_parquet(path)
        if files and _schema_kind(files[0]) == "natix":
            return read_natix_parquet(path, extract_dir)
        raise BadInputError(f"folder {str(path)!r} matches no accepted layout. {LAYOUTS_HELP}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_manifest(path)
    if suffix == ".parquet":
        kind = _schema_kind(path)
        if kind == "manifest":
            return read_manifest(path)
        if kind == "natix":
            return read_natix_parquet(path, extract_dir)
        present = ", ".join(pq.read_schema(path).names)
        raise BadInputError(
            f"parquet file {str(path)!r} has neither a 'path' column (manifest) nor an "
            f"image column (NATIX); columns present: {present}. {LAYOUTS_HELP}"
        )
    raise BadInputError(f"source {str(path)!r} is not a folder, .csv or .parquet file. {LAYOUTS_HELP}")


def _schema_kind(file: Path) -> str | None:
    try:
        schema = pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise BadInputError(f"cannot read parquet file {str(file)!r}: {exc}") from exc
    if "path" in schema.names:
        return "manifest"
    # a column named like an image but of the wrong type still goes to the NATIX reader,
    # whose error names that column and its type
    named = any("image" in name.lower() for name in schema.names)
    return "natix" if _image_column(schema) is not None or named else None
