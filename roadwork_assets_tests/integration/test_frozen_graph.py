"""The production path end to end: a frozen ViT read from a local .safetensors file,
cached embeddings, a linear-probe checkpoint, policies, and a bundle whose ONNX export
passes the served-output parity check — the whole graph through Dagster.

The backbone is timm's tiny ``test_vit`` (6 blocks, width 64) with random weights saved
by the test: the ViT family and checkpoint filter (vision_transformer.py) of the
production DINOv2 ViT at 1/70 of the cost. (The production ViT-S/14 itself,
``"vit_small_patch14_dinov2.lvd142m": (42, 3, 384, 0.9)``, passes this test too: val_test
AUROC 1.0, ONNX logit gap 1.5e-3 against an fp32 tolerance of 0.8 — its random-feature
probe amplifies rounding ~1e5-fold — but it takes 17-40 s on 2 busy cores, so it is left
out of ``BACKBONES``.) A random frozen ViT gives near-chance features on
real photos, so the data are made easy: roadwork images carry a bright orange block on a
dark noisy background, "none" images a blue/grey block or nothing. Nothing else is
relaxed except alpha (0.1 instead of 0.02, so that the ~25 val_calib positives of a
200-image set suffice for CRC).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

N_PER_CLASS = 100
BACKBONES = {  # name: (img_size, patch grid at that size, width, min val_test AUROC)
    "test_vit.r160_in1k": (48, 3, 64, 0.9),
}


def _write_easy_dataset(root, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for label, folder in ((1, "roadwork"), (0, "none")):
        (root / folder).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            # a distinct dark low-frequency scene per image (so no two images are
            # near-duplicates to the splitter's perceptual hash) plus pixel noise
            coarse = Image.fromarray(rng.integers(0, 60, (4, 4, 3), dtype=np.uint8))
            img = np.asarray(coarse.resize((64, 64), Image.BILINEAR), dtype=np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            side = int(rng.integers(24, 40))
            y, x = (int(v) for v in rng.integers(0, 64 - side, 2))
            if label:
                img[y:y + side, x:x + side] = (250, int(rng.integers(90, 150)), 0)
            elif i % 2:
                img[y:y + side, x:x + side] = rng.choice([(40, 80, 220), (150, 150, 150)])
            Image.fromarray(img).save(root / folder / f"{folder}_{i:03d}.png")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_frozen_vit_graph_ends_in_a_verified_bundle(tmp_path, backbone):
    import dagster as dg

    from roadwork_assets import cli
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import load_bundle
    from roadwork_assets.core.export.predictor import BundlePredictor
    from roadwork_assets.core.training.checkpoint import load_checkpoint
    from roadwork_assets.definitions import build_definitions
    from roadwork_assets.defs.resources import DatasetSource, TrainerResource
    from roadwork_assets.defs.runner import materialize_all
    from roadwork_assets_tests.conftest import tiny_resources

    img_size, grid, width, min_auroc = BACKBONES[backbone]
    torch.manual_seed(0)
    vit = timm.create_model(backbone, pretrained=False, num_classes=0)  # at its native size
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    data = tmp_path / "data"
    _write_easy_dataset(data)

    root = tmp_path / "home"
    resources = tiny_resources(root, alpha=0.1)
    resources["dataset"] = DatasetSource(spec=str(data))
    resources["trainer"] = TrainerResource(mode="frozen", backbone=backbone,
                                           weights_path=str(weights), img_size=img_size,
                                           batch_size=64, threads=2)
    defs = build_definitions(resources)
    t0 = time.perf_counter()
    with dg.DagsterInstance.ephemeral() as instance:
        results = materialize_all(defs, instance, say=lambda _m: None)
    seconds = time.perf_counter() - t0

    checks = {}
    for result in results:
        assert result.success
        for ev in result.get_asset_check_evaluations():
            checks[(ev.asset_key.to_user_string(), ev.check_name)] = ev
            assert ev.passed, (ev.asset_key, ev.check_name, ev.description)
    # the embedding step ran the faster engine of auto's timing, ORT only when it matched
    embedded = [e.materialization for r in results for e in r.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey("embeddings")]
    assert len(embedded) >= 4  # every split (and shard)
    for mat in embedded:
        emb = {k: v.value for k, v in mat.metadata.items()}
        rates = {e: emb[f"embed_{e}_img_per_s"] for e in ("torch", "onnx")}
        assert emb["embed_engine"] == max(rates, key=rates.get), emb
        assert emb["embed_onnx_tolerance_ratio"] <= 1 and emb["embed_img_per_s"] > 0
    print(f"embeddings engines: {sorted(str(m.metadata['embed_engine'].value) for m in embedded)}")
    parity = checks[("bundle", "onnx_matches_torch")]
    print(f"frozen {backbone} graph materialized in {seconds:.1f}s; {parity.description}")
    meta = {k: v.value for k, v in parity.metadata.items()}
    assert meta["onnx_served_prob_gap"] <= meta["onnx_served_prob_tolerance"]
    assert meta["onnx_decision_disagreements"] == 0

    reg = ArtifactRegistry(root)
    payload = load_checkpoint(reg.checkpoint)
    assert payload["mode"] == "frozen" and payload["backbone_name"] == backbone
    state = payload["model_state_dict"]
    for key, value in vit.state_dict().items():  # the file's weights, never updated
        if key != "pos_embed":  # resampled to the configured image size
            assert torch.equal(state[f"backbone.{key}"], value), key
    assert state["backbone.pos_embed"].shape == (1, 1 + grid * grid, width)
    report = json.loads(reg.test_report.read_text())
    print(f"val_test AUROC {report['auroc']:.3f}")
    assert report["auroc"] > min_auroc  # easy data: even random frozen features separate it

    bundle_dir = reg.latest_bundle()
    bundle = load_bundle(bundle_dir)
    # the default cascade: stage 2 pools the frozen cache's views (ten-crop skipped)
    assert set(bundle.manifest.files) == {"checkpoint", "policy", "onnx", "probe", "stage2",
                                          "stage2_onnx"}
    assert bundle.stage2.view_source == "cached_views" and bundle.stage2.ten_crop_skipped_reason
    assert bundle.manifest.mode == "frozen" and bundle.manifest.img_size == img_size
    assert cli.main(["verify", str(bundle_dir)]) == 0
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((img_size, img_size))).transpose(2, 0, 1)
                       for p in sorted((data / "roadwork").glob("*.png"))[:4]])
    prob, decision, _stage = BundlePredictor(bundle).predict_arrays(images)
    assert ((prob < 0.5) == (decision == 0)).all()
    assert seconds < 90
