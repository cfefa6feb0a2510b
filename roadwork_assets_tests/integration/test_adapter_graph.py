"""Issue 11's example command, end to end at tiny size, and mode explora through the graph.

``ROADWORK_WEIGHTS=vit.safetensors ROADWORK_BACKBONE=... roadwork run --config-json
'{"resources": {"trainer": {"config": {"mode": "lora", "img_size": 112, "epochs": 1}}}}'``
runs as a subprocess with timm's tiny ``test_vit`` (random weights saved here) on a
200-image easy dataset (only the exit policy is eased: alpha 0.2, a 16-image validator
simulation): the bundle names mode lora and its adapter, its checkpoint holds
no adapter tensor, and ``roadwork predict`` serves it with peft unimportable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roadwork_assets_tests.core.training.test_adapters import VIT, save_weights
from roadwork_assets_tests.integration.test_frozen_graph import _write_easy_dataset

BIN = Path(sys.executable).parent
ISSUE_TRAINER = {"mode": "lora", "img_size": 112, "epochs": 1}


def _env(tmp_path: Path, weights: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ROADWORK_HOME=str(tmp_path / "home"), DAGSTER_HOME=str(tmp_path / "dagster"),
               DAGSTER_TELEMETRY_DISABLED="1", ROADWORK_WEIGHTS=weights,
               ROADWORK_BACKBONE=VIT, ROADWORK_DATA=str(tmp_path / "data"))
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return env


@pytest.mark.slow
def test_issue_example_command_runs_lora_end_to_end(tmp_path):
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import load_bundle
    from roadwork_assets.core.training.checkpoint import load_checkpoint

    weights = save_weights(tmp_path / "vit.safetensors")
    _write_easy_dataset(tmp_path / "data")
    config = {"resources": {"trainer": {"config": ISSUE_TRAINER},
                            # ~25 val_calib positives: alpha 0.02 is not certifiable on them;
                            # the validator simulator and alpha frontier are not under test
                            "exit_policy": {"config": {"alpha": 0.2, "validator_images": 16,
                                                       "cascade_alphas": []}}}}
    t0 = time.perf_counter()
    run = subprocess.run([str(BIN / "roadwork"), "run", "--config-json", json.dumps(config)],
                         env=_env(tmp_path, weights), capture_output=True, text=True,
                         timeout=600, check=False)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '"mode": "lora"' in run.stdout and "weights_path from ROADWORK_WEIGHTS" in run.stdout
    reg = ArtifactRegistry(tmp_path / "home")
    payload = load_checkpoint(reg.checkpoint)
    assert payload["mode"] == "lora" and payload["img_size"] == 112
    assert payload["adapter"]["merged"] and payload["adapter"]["targets"] == [
        "qkv", "proj", "fc1", "fc2"]
    assert not any("lora" in k or "base_layer" in k for k in payload["model_state_dict"])
    bundle_dir = reg.latest_bundle()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["mode"] == "lora" and manifest["adapter"]["kind"] == "lora"
    assert load_bundle(bundle_dir).manifest.mode == "lora"
    images = sorted((tmp_path / "data" / "roadwork").glob("*.png"))[:2]
    serve = ("import sys; sys.modules['peft'] = None\n"
             "from roadwork_assets.cli import main\n"
             f"sys.exit(main(['predict', '--bundle', {str(bundle_dir)!r}, "
             f"*{[str(p) for p in images]!r}]))")
    pred = subprocess.run([sys.executable, "-c", serve], capture_output=True, text=True,
                          timeout=300, check=False)
    assert pred.returncode == 0, pred.stderr[-3000:]
    lines = [json.loads(line) for line in pred.stdout.strip().splitlines()]
    assert len(lines) == 2 and all(0 <= line["probability"] <= 1 for line in lines)
    print(f"issue example command (lora, test_vit, 200 images) ran in {seconds:.1f}s")
    # 132-157 s measured on 2 cores shared with other test runs (load average 6-10), 71 s of
    # it in the last stage (ONNX export of both stages, parity, validator simulator), which
    # mode lora does not change: a generous bound, so a busy machine does not fail it
    assert seconds < 300
