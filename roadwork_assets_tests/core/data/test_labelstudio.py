"""Label Studio round trip on awkward images: queue -> import tasks -> simulated
annotation -> export -> manifest that sources.read_manifest reads with the same labels;
an image already in a split is refused (even re-saved under another name and format),
disagreeing annotators are reported, and a broken export names the task."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.images import decode_image, perceptual_hash, pixel_sha256
from roadwork_assets.core.data.labelstudio import (
    LABEL_CONFIG,
    LOCAL_FILES,
    import_export,
    queue_tasks,
)
from roadwork_assets.core.data.sources import read_manifest
from roadwork_assets_tests.awkward_data import encode_item, generate_awkward


def _hashes(path):
    img = decode_image(path, str(path))
    return pixel_sha256(img), f"{perceptual_hash(img):016x}"


@pytest.fixture()
def world(tmp_path):
    """Pool of 10 awkward images, 4 more already in splits, and a PNG re-save of one of
    those split images placed in the pool under a new name."""
    items = generate_awkward(14, seed=7, image_size=64)
    pool, labelled = tmp_path / "pool", tmp_path / "labelled"
    pool.mkdir()
    labelled.mkdir()
    truth, rows = {}, []
    for k, item in enumerate(items):
        data, ext = encode_item(item)
        folder = pool if k < 10 else labelled
        path = folder / f"{item.item_id}.{ext}"
        path.write_bytes(data)
        if k < 10:
            truth[str(path.resolve())] = item.label
        else:
            sha, ph = _hashes(path)
            rows.append({"item_id": f"labelled/{path.name}", "split": "val_test",
                         "pixel_sha256": sha, "phash": ph})
    # the same pixels under another name and container: still the split's image
    resaved = pool / "new_name.png"
    decode_image(labelled / sorted(p.name for p in labelled.iterdir())[0], "x").save(resaved)
    truth[str(resaved.resolve())] = 1
    return pool, pd.DataFrame(rows), truth


def _queue(paths) -> pd.DataFrame:
    shas, phs = zip(*(_hashes(p) for p in paths), strict=True)
    return pd.DataFrame({"rank": range(1, len(paths) + 1), "path": [str(p) for p in paths],
                         "uncertainty": np.linspace(0.49, 0.2, len(paths)),
                         "probability": 0.4, "prediction": "none",
                         "max_similarity_to_earlier": 0.0,
                         "pixel_sha256": shas, "phash": phs})


def _annotate(task: dict, n: int, *labels: str, cancelled: bool = False) -> dict:
    """A task as Label Studio's JSON export writes it, one annotation per label."""
    return {"id": n, "data": task["data"], "predictions": task["predictions"],
            "annotations": [{"id": 100 * n + a, "completed_by": a + 1, "was_cancelled": cancelled,
                             "result": [{"id": "x", "from_name": "label", "to_name": "image",
                                         "type": "choices", "value": {"choices": [lab]}}]}
                            for a, lab in enumerate(labels)]}


def test_round_trip_labels_match_and_split_images_are_refused(world, tmp_path):
    pool, assignment, truth = world
    paths = sorted(pool.iterdir())
    tasks = queue_tasks(_queue(paths), "bundle-abc", url_root=str(tmp_path))
    assert len(tasks) == len(paths) == 11
    t0 = tasks[0]
    assert t0["data"]["image"].startswith(LOCAL_FILES + "pool/")
    pred = t0["predictions"][0]
    assert pred["model_version"] == "bundle-abc" and pred["score"] == pytest.approx(0.51)
    assert pred["result"][0] | {"id": None} == {
        "id": None, "from_name": "label", "to_name": "image", "type": "choices",
        "value": {"choices": ["none"]}}
    assert '<Choices name="label" toName="image"' in LABEL_CONFIG
    json.dumps(tasks)  # importable as JSON

    name = {str(p.resolve()): p.name for p in paths}
    export, expected = [], {}
    for n, task in enumerate(tasks, start=1):
        path = task["data"]["roadwork_path"]
        label = "roadwork" if truth[str(path)] else "none"
        if name[path] == paths[1].name:  # two annotators disagree
            export.append(_annotate(task, n, "roadwork", "none"))
        elif name[path] == paths[2].name:  # skipped in Label Studio
            export.append(_annotate(task, n, "none", cancelled=True))
        elif name[path] == paths[3].name:  # two annotators agree
            export.append(_annotate(task, n, label, label))
            expected[path] = truth[path]
        else:
            export.append(_annotate(task, n, label))
            if name[path] != "new_name.png":
                expected[path] = truth[path]
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps(export))

    result = import_export(exported, assignment)
    assert result.conflicts[["path", "annotations"]].values.tolist() == [
        [str(paths[1].resolve()), "1=roadwork; 2=none"]]
    assert result.unlabelled["path"].tolist() == [str(paths[2].resolve())]
    refused = result.refused.set_index("path")["reason"]
    assert list(refused.index) == [str((pool / "new_name.png").resolve())]
    assert "already in a split" in refused.iloc[0] and "labelled/" in refused.iloc[0]
    assert "(split val_test)" in refused.iloc[0]

    manifest_path = tmp_path / "new_labels.csv"
    result.manifest.to_csv(manifest_path, index=False)
    records = read_manifest(manifest_path)
    assert dict(zip(records["uri"], records["label"].astype(int), strict=True)) == expected
    agreed = result.manifest.set_index("path").loc[str(paths[3].resolve()), "annotators"]
    assert agreed == "1, 2"


def test_local_files_url_without_our_keys_resolves_under_the_document_root(world, tmp_path):
    pool, assignment, _ = world
    path = sorted(p for p in pool.iterdir() if p.name != "new_name.png")[0]
    task = queue_tasks(_queue([path]), "m", url_root=str(tmp_path))[0]
    task["data"] = {"image": task["data"]["image"]}  # as if imported by hand
    exported = tmp_path / "export.json"
    exported.write_text(json.dumps([_annotate(task, 1, "roadwork")]))
    result = import_export(exported, assignment, url_root=str(tmp_path))
    assert result.manifest["path"].tolist() == [str(path.resolve())]


def test_bad_exports_name_the_task(world, tmp_path):
    _, assignment, _ = world
    f = tmp_path / "e.json"
    cases = [
        ("{not json", "is not JSON"),
        ('{"tasks": []}', "not a list of tasks"),
        ('[{"id": 7, "annotations": []}]', r"task 7 \(entry 0\) has no 'data'"),
        ('[{"id": 8, "data": {"text": "x"}, "annotations": []}]',
         r"task 8 \(entry 0\) has no data.image"),
        (json.dumps([{"id": 9, "data": {"image": "/x.jpg"}, "annotations": [
            {"completed_by": 3, "result": [{"type": "choices",
                                             "value": {"choices": ["maybe"]}}]}]}]),
         r"task 9 \(entry 0\), annotation by 3 chose \['maybe'\]"),
        ('[{"data": {"image": "/x.jpg"}, "annotations": {"a": 1}}]',
         "task at entry 0 has 'annotations' that is not a list"),
    ]
    for text, message in cases:
        f.write_text(text)
        with pytest.raises(BadInputError, match=message):
            import_export(f, assignment)
    with pytest.raises(BadInputError, match="does not exist"):
        import_export(tmp_path / "missing.json", assignment)
    with pytest.raises(BadInputError, match="lacks column"):
        import_export(f, assignment.drop(columns=["pixel_sha256"]))


def test_unreadable_annotated_image_is_refused_not_fatal(world, tmp_path):
    _, assignment, _ = world
    gone = tmp_path / "deleted.jpg"
    f = tmp_path / "e.json"
    f.write_text(json.dumps([_annotate({"data": {"image": "x", "roadwork_path": str(gone)},
                                        "predictions": []}, 1, "none")]))
    result = import_export(f, assignment)
    assert result.manifest.empty
    assert "cannot be read" in result.refused["reason"].iloc[0]


def test_import_labels_command_writes_the_manifest_and_lists(world, tmp_path, monkeypatch, capsys):
    from roadwork_assets.cli import main
    from roadwork_assets.core.artifacts import ArtifactRegistry

    pool, assignment, truth = world
    home = tmp_path / "home"
    monkeypatch.setenv("ROADWORK_HOME", str(home))
    export = tmp_path / "export.json"
    tasks = queue_tasks(_queue(sorted(pool.iterdir())), "m")
    export.write_text(json.dumps([_annotate(t, n, "roadwork" if truth[t["data"]["roadwork_path"]]
                                            else "none") for n, t in enumerate(tasks)]))
    out = tmp_path / "labels" / "new.csv"
    assert main(["import-labels", str(export), "--out", str(out)]) == 2
    assert "no split assignment" in capsys.readouterr().err
    reg = ArtifactRegistry(home)
    reg.split_assignment.parent.mkdir(parents=True)
    assignment.to_parquet(reg.split_assignment)
    assert main(["import-labels", str(export), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 labelled images" in printed and "1 refused" in printed
    assert len(read_manifest(out)) == 10
    refused = pd.read_csv(out.with_name("new.refused.csv"))
    assert refused["path"].str.endswith("new_name.png").tolist() == [True]
