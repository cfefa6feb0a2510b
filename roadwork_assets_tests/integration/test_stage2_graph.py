"""Stage 2 in the whole graph (the session's tiny materialized run): ten-crop views of
the stage-1 model, one aggregator chosen on val_select and compared with the single view,
and [N, 1, 2] logits per split stamped with both checkpoints' sha256."""

from __future__ import annotations

from roadwork_assets.contracts.multiview_schemas import load_multiview_checkpoint
from roadwork_assets.contracts.splits import SPLITS
from roadwork_assets.core.artifacts import ArtifactRegistry, file_sha256, read_npz


def test_stage2_multiview_is_fitted_compared_and_aligned(materialized_root):
    """Stage 2: ten-crop views of the stage-1 model, one aggregator chosen on val_select,
    compared with the single view; its logits are [N, 1, 2], stamped with both sha256."""
    root, _, _ = materialized_root
    reg = ArtifactRegistry(root)
    stage2 = load_multiview_checkpoint(reg.multiview_checkpoint)
    assert stage2.view_source == "ten_crop" and len(stage2.views) == 10
    rows = {r.aggregator: r for r in stage2.comparison}
    assert set(rows) == {"single_view", "mean", "max", "attention"}
    assert stage2.aggregator == min(("mean", "max", "attention"), key=lambda a: rows[a].nll)
    print("\nval_select", *(r.model_dump() for r in stage2.comparison), sep="\n")
    for split in SPLITS:
        n = len(read_npz(reg.logits(split))["logits"])
        views = read_npz(reg.multiview_views(split))
        assert views["logits"].shape == (n, 10, 2) and str(views["view_source"]) == "ten_crop"
        z = read_npz(reg.multiview_logits(split))
        assert z["logits"].shape == (n, 1, 2)
        assert str(z["checkpoint_sha256"]) == file_sha256(reg.checkpoint)
        assert str(z["multiview_checkpoint_sha256"]) == file_sha256(reg.multiview_checkpoint)
