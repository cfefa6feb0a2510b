"""The checkpoint is a schema (contracts.schemas.CheckpointMeta) plus its tensors: checked
on save and on load, and a file that lacks a field its readers need is refused, naming
the field and the fix."""

from __future__ import annotations

import pytest
import torch

from roadwork_assets.contracts.errors import ArtifactIntegrityError
from roadwork_assets.contracts.schemas import CheckpointMeta
from roadwork_assets.core.training.checkpoint import load_checkpoint, save_checkpoint

META = {"epoch": 3, "best_metric": 0.2, "best_metric_name": "val_select_nll",
        "config": {"img_size": 64, "n_views": 2}, "backbone_name": "test_resnet.r160_in1k",
        "mode": "end_to_end", "data_version": "d", "code_version": "c",
        "assignment_version": "a1", "weights_sha256": "",
        "select_metrics": {"nll": 0.2, "balanced_accuracy": 0.9}}


def _state():
    return {"w": torch.arange(4.0), "b": torch.zeros(2)}


def _raw(path, **changes):
    """A checkpoint dict written straight with torch.save (no schema check)."""
    good = path.parent / "good.pt"
    save_checkpoint(good, model_state_dict=_state(), **META)
    payload = torch.load(good, weights_only=True)
    payload.update({k: v for k, v in changes.items() if v is not None})
    for key in [k for k, v in changes.items() if v is None]:
        del payload[key]
    torch.save(payload, path)
    return path


def test_round_trip_holds_every_schema_field_and_the_tensors(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", model_state_dict=_state(), **META)
    payload = load_checkpoint(path)
    assert set(payload) == set(CheckpointMeta.model_fields) | {"model_state_dict"}
    assert payload["schema_version"] == 1
    assert payload["assignment_version"] == "a1" and payload["weights_sha256"] == ""
    assert payload["img_size"] == 64  # from config when not given
    assert all(torch.equal(payload["model_state_dict"][k], v) for k, v in _state().items())


@pytest.mark.parametrize("key", ["assignment_version", "weights_sha256", "data_version",
                                 "schema_version", "model_state_dict"])
def test_checkpoint_missing_a_required_key_is_refused_naming_it(tmp_path, key):
    path = _raw(tmp_path / "model.pt", **{key: None})
    with pytest.raises(ArtifactIntegrityError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert f"lacks required keys ['{key}']" in msg
    assert "re-materialize `checkpoint`" in msg


@pytest.mark.parametrize("key", ["assignment_version", "weights_sha256"])
def test_save_refuses_metadata_without_a_required_field(tmp_path, key):
    dest = tmp_path / "model.pt"
    meta = {k: v for k, v in META.items() if k != key}
    with pytest.raises(ArtifactIntegrityError, match=rf"missing required field\(s\) \['{key}'\]"
                       r".*CheckpointMeta"):
        save_checkpoint(dest, model_state_dict=_state(), **meta)
    assert not dest.exists()


@pytest.mark.parametrize("changes, needle", [
    ({"mode": "sideways"}, "mode:"),
    ({"epoch": "last"}, "epoch:"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"img_size": 96}, "img_size 96 differs from config img_size 64"),
])
def test_checkpoint_not_matching_the_schema_is_refused(tmp_path, changes, needle):
    path = _raw(tmp_path / "model.pt", **changes)
    with pytest.raises(ArtifactIntegrityError, match="does not match its schema") as err:
        load_checkpoint(path)
    assert needle in str(err.value) and "re-materialize `checkpoint`" in str(err.value)


def test_unknown_checkpoint_schema_version_and_bad_state_dict_are_refused(tmp_path):
    with pytest.raises(ArtifactIntegrityError, match="schema_version 2; this code reads 1"):
        load_checkpoint(_raw(tmp_path / "v2.pt", schema_version=2))
    with pytest.raises(ArtifactIntegrityError, match="not a dict of named tensors"):
        load_checkpoint(_raw(tmp_path / "state.pt", model_state_dict={"w": [1.0]}))
