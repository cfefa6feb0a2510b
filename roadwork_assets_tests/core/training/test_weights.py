"""Backbone weight files: .safetensors and .pth load the same tensors through timm's
checkpoint filter; a pickle that runs code is refused before it runs; a file from
another architecture names what does not fit and what to do."""

from __future__ import annotations

import os
import shlex

import pytest
import timm
import torch
from safetensors.torch import save_file

from roadwork_assets.contracts.errors import BadInputError
from roadwork_assets.core.models.classifier import create_backbone
from roadwork_assets.core.models.weights import read_weights_file

TINY_VIT = "test_vit.r160_in1k"  # timm's 0.3M-parameter ViT: patch 16, width 64, 6 blocks


@pytest.fixture(scope="module")
def source_state():
    """A random-init tiny ViT at its native 160 px (10x10 patches), as a user would save it."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT, pretrained=False, num_classes=0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _assert_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(source)
    for key, value in source.items():
        if key == "pos_embed":  # resampled by timm's ViT filter from 10x10 to 2x2 patches
            assert state[key].shape == (1, 1 + 2 * 2, 64)
            torch.testing.assert_close(state[key][:, 0], value[:, 0])  # class token: kept
        else:
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_both_formats_load_every_tensor_and_resample_pos_embed(tmp_path, source_state, suffix):
    path = tmp_path / f"tiny_vit{suffix}"
    if suffix == ".safetensors":
        save_file(source_state, str(path))
    else:
        torch.save(source_state, path)
    _assert_loaded(create_backbone(TINY_VIT, img_size=32, weights_path=path), source_state)


def test_timm_never_reads_the_file(tmp_path, source_state, monkeypatch):
    """Whatever timm version is installed, its own (possibly unsafe) loader is not called."""
    import timm.models._builder as builder

    def forbidden(*_a, **_k):
        raise AssertionError("timm's pretrained loader was called")

    monkeypatch.setattr(builder, "load_pretrained", forbidden)
    path = tmp_path / "w.pth"
    torch.save(source_state, path)
    _assert_loaded(create_backbone(TINY_VIT, img_size=32, weights_path=path), source_state)


@pytest.mark.parametrize("wrap", ["model", "state_dict_ddp", "dino_teacher"])
def test_common_checkpoint_wrappers_are_unwrapped(tmp_path, source_state, wrap):
    if wrap == "model":
        payload = {"model": source_state, "epoch": 3}
    elif wrap == "state_dict_ddp":
        payload = {"state_dict": {f"module.{k}": v for k, v in source_state.items()}}
    else:  # DINO/DINOv2 teacher checkpoint: backbone.* plus a projection head to drop
        payload = {"teacher": {**{f"backbone.{k}": v for k, v in source_state.items()},
                               "dino_head.mlp.0.weight": torch.zeros(8, 64)}}
    path = tmp_path / "wrapped.pth"
    torch.save(payload, path)
    _assert_loaded(create_backbone(TINY_VIT, img_size=32, weights_path=path), source_state)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted 'weights' file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, source_state):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({**source_state, "extra": _RunsCode(f"touch {shlex.quote(str(marker))}")}, path)
    with pytest.raises(BadInputError, match=r"refusing to load weights file .*evil\.pth.*safetensors"):
        create_backbone(TINY_VIT, img_size=32, weights_path=path)
    assert not marker.exists()
    # the payload is live: an unrestricted unpickler (what timm 1.0.15-1.0.25 used) runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_file_from_another_architecture_names_keys_and_the_fix(tmp_path, source_state):
    damaged = {k: v for k, v in source_state.items() if k != "blocks.5.mlp.fc2.bias"}
    damaged["head.extra.weight"] = torch.zeros(2)
    path = tmp_path / "other.safetensors"
    save_file(damaged, str(path))
    with pytest.raises(BadInputError) as err:
        create_backbone(TINY_VIT, img_size=32, weights_path=path)
    msg = str(err.value)
    assert "1 missing (blocks.5.mlp.fc2.bias)" in msg
    assert "1 unexpected (head.extra.weight)" in msg
    assert "set ROADWORK_BACKBONE" in msg and "\n" not in msg
    # a deeper ViT's file (8 blocks, layer scale): the message says what the file is
    torch.manual_seed(0)
    deeper = timm.create_model("test_vit2.r160_in1k", pretrained=False, num_classes=0)
    path2 = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(path2))
    with pytest.raises(BadInputError, match=r"does not fit timm model 'test_vit.r160_in1k'.*"
                       r"the model is 6 blocks, width 64"):
        create_backbone(TINY_VIT, img_size=32, weights_path=path2)


def test_unknown_suffix_and_damaged_file_are_clear_errors(tmp_path):
    odd = tmp_path / "weights.ckpt"
    odd.write_bytes(b"x")
    with pytest.raises(BadInputError, match=r"suffix '.ckpt'; accepted: .safetensors, .pth"):
        read_weights_file(odd)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        read_weights_file(broken)
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(BadInputError, match="unreadable or truncated"):
        read_weights_file(truncated)
