"""`roadwork predict` as a newcomer uses it, on a real materialized bundle: no --bundle
(the latest under ROADWORK_HOME), the bundles folder itself, and a batch with one corrupt
file (an error line for it, predictions for the rest, exit code 1)."""

from __future__ import annotations

import json
import shutil

import pytest

from roadwork_assets import cli
from roadwork_assets.core.artifacts import ArtifactRegistry

FAST = ["--skip-onnx-check", "--engine", "torch"]


def _images(root, n: int = 2) -> list[str]:
    return [str(p) for p in sorted((root / "data" / "default" / "images" / "roadwork")
                                   .glob("*.jpg"))[:n]]


def _run(capsys, argv: list[str]) -> tuple[int, list[dict], str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.strip().splitlines()], err


@pytest.fixture
def home(materialized_root, monkeypatch):
    root, _, _ = materialized_root
    monkeypatch.setenv("ROADWORK_HOME", str(root))
    return root


def test_predict_without_bundle_uses_the_latest_under_roadwork_home(home, capsys):
    images = _images(home)
    code, lines, err = _run(capsys, ["predict", *FAST, *images])
    assert code == 0, err
    assert [line["path"] for line in lines] == images
    assert all(0.0 <= line["probability"] <= 1.0 for line in lines)


@pytest.mark.parametrize("which", ["bundles_dir", "roadwork_home", "bundle"])
def test_predict_accepts_the_bundles_folder_and_home(home, capsys, which):
    reg = ArtifactRegistry(home)
    given = {"bundles_dir": reg.bundles_dir, "roadwork_home": home,
             "bundle": reg.latest_bundle()}[which]
    code, lines, err = _run(capsys, ["predict", "--bundle", str(given), *FAST, *_images(home, 1)])
    assert code == 0, err
    assert len(lines) == 1 and "probability" in lines[0]


def test_one_corrupt_image_gets_an_error_line_and_the_rest_are_predicted(home, tmp_path, capsys):
    good = _images(home, 2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    copy = tmp_path / "good.jpg"
    shutil.copyfile(good[1], copy)
    paths = [good[0], str(corrupt), str(copy)]
    code, lines, err = _run(capsys, ["predict", *FAST, *paths])
    assert code == cli.EXIT_SOME_IMAGES_FAILED == 1
    assert [line["path"] for line in lines] == paths  # input order, one line each
    assert set(lines[1]) == {"path", "error"} and "corrupt.jpg" in lines[1]["error"]
    for line in (lines[0], lines[2]):
        assert "error" not in line and 0.0 <= line["probability"] <= 1.0
    err_lines = err.strip().splitlines()
    assert err_lines[0].startswith(f"roadwork predict: {corrupt}: ")
    assert err_lines[-1] == "roadwork predict: 1 of 3 images failed"


def test_no_bundle_anywhere_is_one_line_and_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROADWORK_HOME", str(tmp_path / "empty"))
    code = cli.main(["predict", str(tmp_path / "x.jpg")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"roadwork predict: error: no bundle under ROADWORK_HOME={tmp_path / 'empty'}: run "
        "`roadwork run` first, or pass --bundle DIR"]


def test_roadwork_run_terminal_shows_progress_and_the_bundle_not_the_event_stream(tmp_path):
    """A tiny `roadwork run` as a subprocess (new DAGSTER_HOME, new MLflow database): the
    terminal has the stage lines, progress with rate and ETA, the bundle's id and folder,
    and none of Dagster's DEBUG events, the MLflow BetaWarnings or MLflow/alembic database
    lines (those need --verbose; tests/defs/test_console.py runs both modes). Then
    `roadwork predict` with no --bundle serves that bundle."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from roadwork_assets_tests.integration.test_cli import SMALL, _env

    bin_dir = Path(sys.executable).parent
    env = _env(tmp_path)
    run = subprocess.run([str(bin_dir / "roadwork"), "run", "--config-json", json.dumps(SMALL)],
                         env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = run.stdout + run.stderr
    for noise in (" - DEBUG - ", "STEP_START", "BetaWarning", "mlflow.store.db.utils",
                  "alembic", "Creating a new experiment"):
        assert noise not in text, noise
    lines = run.stdout.splitlines()
    assert any(re.fullmatch(r"\[roadwork\]   source_images: generate default dataset: "
                            r"\d+/320 \(\d+%\) [\d.]+/s (ETA \S+|done in \S+)", line)
               for line in lines), run.stdout[:3000]
    for stage in ("decode images", "decode + resize", "train epochs", "logits",
                  "ten-crop views"):
        assert any(f": {stage}: " in line for line in lines), stage
    home = ArtifactRegistry(tmp_path / "home")
    bundle = home.latest_bundle()
    assert f"[roadwork] bundle: {bundle.name}" in lines
    assert f"[roadwork]   in {bundle}" in lines
    image = sorted((home.default_dataset_dir / "images" / "none").glob("*.jpg"))[0]
    pred = subprocess.run([str(bin_dir / "roadwork"), "predict", *FAST, str(image)],
                          env=dict(env, ROADWORK_HOME=os.fspath(home.root)),
                          capture_output=True, text=True, timeout=300, check=False)
    assert pred.returncode == 0, pred.stderr
    assert json.loads(pred.stdout)["path"] == str(image)
