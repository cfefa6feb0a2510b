"""label_queue's ranking: uncertainty x novelty keeps twenty frames of one uncertain scene from filling the
queue, the uncertainty is the bundle's own (gate P(wrong) / calibrated max-prob), and a
real bundle scores a real folder, awkward files included."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.data.active_learning import (
    ActiveLearningConfig,
    bundle_uncertainty,
    diverse_select,
    label_queue,
    pool_files,
    score_pool,
)


def _pool(seed: int = 0, dim: int = 32):
    """Scene A: 20 near-identical frames, the most uncertain of the pool; 15 other
    scenes of 1-2 frames each, uncertain too but less."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    emb = [base + 0.02 * rng.normal(size=dim) for _ in range(20)]
    u = list(0.49 - 0.001 * rng.random(20))
    scene = ["A"] * 20
    for s in range(15):
        centre = rng.normal(size=dim)
        for _ in range(1 + s % 2):
            emb.append(centre + 0.05 * rng.normal(size=dim))
            u.append(rng.uniform(0.30, 0.45))
            scene.append(f"S{s}")
    return np.array(u), np.array(emb), np.array(scene)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twenty_frames_of_one_scene_do_not_fill_the_queue(seed):
    u, emb, scene = _pool(seed)
    picked, sims = diverse_select(u, emb, top_k=10)
    assert len(set(picked.tolist())) == 10
    assert (scene[picked] == "A").sum() <= 1
    assert scene[picked[0]] == "A"  # the most uncertain image still comes first
    # ten different scenes: at most one repeat of anything
    assert len(set(scene[picked])) >= 9
    assert sims[0] == 0.0 and np.all(sims >= 0)
    # without the diversity term the scene fills the queue: the term does the work
    only_u, _ = diverse_select(u, emb, top_k=10, diversity=0.0)
    assert (scene[only_u] == "A").sum() == 10


def test_mmr_picks_by_uncertainty_among_unrelated_images_and_refuses_bad_input():
    rng = np.random.default_rng(3)
    u = rng.random(30)
    emb = np.eye(30)  # mutually orthogonal: no redundancy anywhere
    picked, _ = diverse_select(u, emb, top_k=5)
    assert picked.tolist() == np.argsort(-u)[:5].tolist()
    assert len(diverse_select(u[:3], emb[:3, :3], top_k=10)[0]) == 3  # k > pool: the pool
    with pytest.raises(BadInputError, match="one embedding row per image"):
        diverse_select(u, emb[:5], top_k=3)
    with pytest.raises(BadInputError, match="NaN"):
        diverse_select(np.r_[np.nan, u[1:]], emb, top_k=3)


def test_uncertainty_is_the_gates_p_wrong_or_calibrated_max_prob():
    from roadwork_assets.core.calibration.policies import (
        apply_policy,
        fit_policy,
        policy_probability,
    )
    from roadwork_assets_tests.core.evaluation.conftest import synthetic_logits

    c, t = synthetic_logits(1), synthetic_logits(2)
    softmax = fit_policy("softmax", c["views"], c["labels"], c["ids"], groups=c["groups"],
                         alpha=0.1)
    p = policy_probability(softmax, t["views"])
    np.testing.assert_allclose(bundle_uncertainty(softmax, t["views"]), np.minimum(p, 1 - p))
    gate = fit_policy("gate", c["views"], c["labels"], c["ids"], groups=c["groups"], alpha=0.1)
    u = bundle_uncertainty(gate, t["views"])
    assert u.min() >= 0 and u.max() <= 1
    # the gate defers exactly the images whose P(wrong) exceeds its tau
    decision, _ = apply_policy(gate, t["views"])
    np.testing.assert_array_equal(decision == -1, u > gate.gate.tau)


def _write(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(path)


def test_score_pool_on_a_real_bundle_lists_unreadable_files(cascade_bundle_dir, tmp_path):
    from roadwork_assets.core.export.bundle import load_bundle

    rng = np.random.default_rng(0)
    pool = tmp_path / "pool"
    for i in range(6):
        _write(pool / f"street_{i}.png", rng.integers(0, 255, (40 + 7 * i, 50, 3)))
    (pool / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (pool / ".hidden.png").write_bytes(b"")
    _write(pool / "sub" / "grey.png", np.full((33, 65), 128))  # greyscale, odd size
    files = pool_files(pool)
    assert [f.name for f in files] == ["broken.jpg", "street_0.png", "street_1.png",
                                       "street_2.png", "street_3.png", "street_4.png",
                                       "street_5.png", "grey.png"]
    bundle = load_bundle(cascade_bundle_dir, check_onnx=False)
    scores = score_pool(bundle, files, ActiveLearningConfig(top_k=4, batch_size=4))
    assert [f["path"] for f in scores.failed] == [str(pool / "broken.jpg")]
    assert "broken.jpg" in scores.failed[0]["reason"]
    assert len(scores.paths) == 7 and scores.embeddings.shape[0] == 7
    p1 = scores.uncertainty
    assert np.all((p1 >= 0) & (p1 <= 0.5))
    queue = label_queue(scores, ActiveLearningConfig(top_k=4))
    assert queue["rank"].tolist() == [1, 2, 3, 4]
    assert queue["path"].is_unique and set(queue["prediction"]) <= {"roadwork", "none"}
    assert queue["uncertainty"].iloc[0] == pytest.approx(p1.max())
    with pytest.raises(BadInputError, match="not a folder"):
        pool_files(tmp_path / "nope")


@pytest.fixture(scope="module")
def cascade_bundle_dir(tmp_path_factory):
    from roadwork_assets.core.artifacts import ArtifactRegistry
    from roadwork_assets.core.export.bundle import build_bundle
    from roadwork_assets_tests.core.export.conftest import (
        fit_cascade_artifacts,
        save_tiny_checkpoint,
    )

    reg = ArtifactRegistry(tmp_path_factory.mktemp("al_bundle"))
    save_tiny_checkpoint(reg.checkpoint)
    policy_path, stage2_path = fit_cascade_artifacts(reg, n=160)
    directory, _, _ = build_bundle(reg.bundles_dir, checkpoint_path=reg.checkpoint,
                                   policy_path=policy_path, policy_asset="cascade_policy",
                                   export_onnx_model=False, stage2_path=stage2_path)
    return directory
