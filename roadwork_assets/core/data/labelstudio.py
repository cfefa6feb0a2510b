"""Label Studio in and out: the label queue as import tasks with the model's
pre-annotation, and Label Studio's JSON export back as a labelled manifest.

Out (``queue_tasks``): one task per queued image in Label Studio's import format,
``{"data": {"image": ...}, "predictions": [{"model_version", "score", "result": [
{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices":
["roadwork"]}}]}]}`` for the labelling config ``LABEL_CONFIG``; ``data`` also carries
the file's absolute path and content hashes (``roadwork_*`` keys) so the export maps
back to the file whatever URL Label Studio served it under. ``score`` = 1 - u, so
Label Studio's "sort by prediction score" puts the most uncertain first.

In (``import_export``): the "JSON" export (a list of tasks with
``annotations[].result[].value.choices``). An image is labelled only when every
non-cancelled annotation of its task agrees; disagreements are listed as conflicts,
never resolved. An image whose decoded pixels (pixel_sha256) or pHash equal those of an
image already in the split assignment is refused with the item it matches: a new label
would relabel an image of a split (and could move test content into training). The
result is a manifest (``path, label, group_id``) that ``core.data.sources.read_manifest``
reads, so it can be added to ROADWORK_DATA.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

import pandas as pd

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import decode_image, perceptual_hash, pixel_sha256

CHOICES = {"roadwork": 1, "none": 0}
FROM_NAME, TO_NAME = "label", "image"
LABEL_CONFIG = (
    '<View>\n  <Image name="image" value="$image"/>\n'
    '  <Choices name="label" toName="image" choice="single" showInline="true" required="true">\n'
    '    <Choice value="roadwork"/>\n    <Choice value="none"/>\n  </Choices>\n</View>\n')
LOCAL_FILES = "/data/local-files/?d="


def image_url(path: str, url_root: str) -> str:
    """Label Studio's local-files URL of ``path`` under the document root ``url_root``."""
    rel = posixpath.relpath(Path(path).resolve().as_posix(), Path(url_root).resolve().as_posix())
    if rel.startswith(".."):
        raise BadInputError(f"pool image {path!r} is outside Label Studio's document root "
                            f"{url_root!r}: set url_root to a folder that holds the pool")
    return LOCAL_FILES + quote(rel)


def queue_tasks(queue: pd.DataFrame, model_version: str, url_root: str = "/") -> list[dict]:
    """Label Studio import tasks of a ``core.data.active_learning.label_queue`` table."""
    tasks = []
    for row in queue.itertuples(index=False):
        tasks.append({
            "data": {"image": image_url(row.path, url_root), "roadwork_path": row.path,
                     "roadwork_pixel_sha256": row.pixel_sha256, "roadwork_phash": row.phash,
                     "roadwork_rank": int(row.rank),
                     "roadwork_uncertainty": round(float(row.uncertainty), 6)},
            "predictions": [{
                "model_version": model_version,
                "score": round(1.0 - float(row.uncertainty), 6),
                "result": [{"id": f"r{int(row.rank)}", "from_name": FROM_NAME,
                            "to_name": TO_NAME, "type": "choices",
                            "value": {"choices": [row.prediction]}}],
            }],
        })
    return tasks


# --------------------------------------------------------------------- import
def _name(task: Any, i: int) -> str:
    tid = task.get("id") if isinstance(task, dict) else None
    return f"task {tid} (entry {i})" if tid is not None else f"task at entry {i}"


def _task_path(task: dict, name: str, url_root: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise BadInputError(f"Label Studio export: {name} has no 'data' object; export the "
                            "project again in the 'JSON' format")
    if data.get("roadwork_path"):
        return str(data["roadwork_path"])
    url = data.get("image")
    if not isinstance(url, str) or not url:
        raise BadInputError(f"Label Studio export: {name} has no data.image (and no "
                            "data.roadwork_path): it did not come from label_queue's tasks")
    parsed = urlparse(url)
    if parsed.path.endswith("/data/local-files/") and "d" in parse_qs(parsed.query):
        return str(Path(url_root) / unquote(parse_qs(parsed.query)["d"][0]))
    return url


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who is not None else f"annotation {annotation.get('id', '?')}"


def _choices(task: dict, name: str) -> list[tuple[str, int]]:
    """(annotator, label) of every non-cancelled annotation that chose a class."""
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list):
        raise BadInputError(f"Label Studio export: {name} has 'annotations' that is not a list")
    out = []
    for a in annotations:
        if not isinstance(a, dict) or not isinstance(a.get("result", []), list):
            raise BadInputError(f"Label Studio export: {name} holds an annotation that is not "
                                "an object with a 'result' list")
        if a.get("was_cancelled"):
            continue
        picked = [c for r in a.get("result", []) if isinstance(r, dict)
                  and r.get("type") == "choices"
                  for c in (r.get("value") or {}).get("choices", [])]
        if not picked:
            continue
        unknown = [c for c in picked if c not in CHOICES]
        if unknown or len(set(picked)) > 1:
            raise BadInputError(
                f"Label Studio export: {name}, annotation by {_annotator(a)} chose "
                f"{picked}; expected exactly one of {sorted(CHOICES)} (the LABEL_CONFIG "
                "labelling interface)")
        out.append((_annotator(a), CHOICES[picked[0]]))
    return out


def read_export(path: Path | str) -> list[dict]:
    """The export's task list; a clear error for a file that is not one."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"Label Studio export {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"Label Studio export {str(path)!r} is not JSON ({exc}): export "
                            "the project in the 'JSON' format (not JSON-MIN or CSV)") from exc
    if not isinstance(tasks, list):
        raise BadInputError(f"Label Studio export {str(path)!r} holds a {type(tasks).__name__}, "
                            "not a list of tasks: export the project in the 'JSON' format")
    return tasks


@dataclass
class LabelImport:
    manifest: pd.DataFrame  # path, label, group_id, labelstudio_task, annotators
    refused: pd.DataFrame  # task, path, reason
    conflicts: pd.DataFrame  # task, path, annotations ("annotator=label; ...")
    unlabelled: pd.DataFrame  # task, path: no annotation chose a class


def _split_index(assignment: pd.DataFrame) -> tuple[dict, dict]:
    def describe(row) -> str:
        return f"{row['item_id']!r} (split {row['split']})"

    rows = assignment.drop_duplicates("pixel_sha256")
    by_sha = {r["pixel_sha256"]: describe(r) for _, r in rows.iterrows()}
    by_phash = ({r["phash"]: describe(r) for _, r in assignment.drop_duplicates("phash").iterrows()}
                if "phash" in assignment else {})
    return by_sha, by_phash


def _refusal(path: str, by_sha: dict, by_phash: dict, seen: dict) -> tuple[str | None, str]:
    """(reason or None, pixel_sha256) for one annotated image."""
    try:
        img = decode_image(Path(path), path)
    except BadInputError as exc:
        return f"cannot be read: {exc}", ""
    sha, ph = pixel_sha256(img), f"{perceptual_hash(img):016x}"
    if sha in by_sha:
        return (f"already in a split: identical pixels to {by_sha[sha]}; a label from Label "
                "Studio would relabel it, so it is left as the split has it"), sha
    if ph in by_phash:
        return (f"already in a split: same perceptual hash as {by_phash[ph]} (a copy); "
                "left out so no split image is relabelled"), sha
    if sha in seen:
        return f"the same image as {seen[sha]} of this export", sha
    return None, sha


def import_export(export: Path | str, assignment: pd.DataFrame, url_root: str = "/") -> LabelImport:
    """Label Studio's JSON export -> ``LabelImport`` (module docstring). ``assignment``:
    the split_assignment table (item_id, split, pixel_sha256, phash)."""
    missing = {"item_id", "split", "pixel_sha256"} - set(assignment.columns)
    if missing:
        raise BadInputError(f"split assignment lacks column(s) {sorted(missing)}: "
                            "re-materialize split_assignment")
    by_sha, by_phash = _split_index(assignment)
    rows, refused, conflicts, unlabelled, seen = [], [], [], [], {}
    for i, task in enumerate(read_export(export)):
        name = _name(task, i)
        if not isinstance(task, dict):
            raise BadInputError(f"Label Studio export: {name} is not an object")
        path = _task_path(task, name, url_root)
        votes = _choices(task, name)
        if not votes:
            unlabelled.append({"task": name, "path": path})
            continue
        if len({label for _, label in votes}) > 1:
            conflicts.append({"task": name, "path": path, "annotations": "; ".join(
                f"{who}={'roadwork' if label else 'none'}" for who, label in votes)})
            continue
        reason, sha = _refusal(path, by_sha, by_phash, seen)
        if reason:
            refused.append({"task": name, "path": path, "reason": reason})
            continue
        seen[sha] = name
        rows.append({"path": str(Path(path).resolve()), "label": votes[0][1], "group_id": None,
                     "labelstudio_task": name,
                     "annotators": ", ".join(sorted({who for who, _ in votes}))})
    return LabelImport(
        pd.DataFrame(rows, columns=["path", "label", "group_id", "labelstudio_task", "annotators"]),
        pd.DataFrame(refused, columns=["task", "path", "reason"]),
        pd.DataFrame(conflicts, columns=["task", "path", "annotations"]),
        pd.DataFrame(unlabelled, columns=["task", "path"]))


def write_import(result: LabelImport, out: Path | str) -> dict[str, Path]:
    """The manifest at ``out`` (CSV, the layout ``read_manifest`` reads) and, beside it,
    ``<stem>.refused.csv``, ``<stem>.conflicts.csv``, ``<stem>.unlabelled.csv``."""
    from roadwork_assets.core.artifacts import atomic_write_text

    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise BadInputError(f"{str(out)!r}: the labelled manifest is written as CSV; name it *.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"manifest": out}
    for name in ("refused", "conflicts", "unlabelled"):
        paths[name] = out.with_name(f"{out.stem}.{name}.csv")
    frames = {"manifest": result.manifest, "refused": result.refused,
              "conflicts": result.conflicts, "unlabelled": result.unlabelled}
    for name, path in paths.items():
        atomic_write_text(path, frames[name].to_csv(index=False))
    return paths
