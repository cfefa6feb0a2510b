"""torch.compile for the trainer: one wrapper used for training, embedding and logits.

``compiled(fn, settings)`` returns ``fn`` itself when compile is off and
``torch.compile(fn, mode=, fullgraph=, dynamic=)`` when it is on. ``fn`` is a module
(training step, end-to-end logits) or a bound method (``model.features`` for frozen
embeddings, ``model.forward_head`` for head logits); the compiled callable shares the
module's parameters, so the optimiser, ``state_dict`` and checkpoint are untouched.
Dynamo caches per code object and guards on the module, so calling ``compiled`` again
on the same model (every epoch's val_select pass) reuses the compiled graph; the switch
between ``train()`` and ``eval()`` costs one recompile each, the ragged last batch one
more (then ``dynamic=None`` marks the batch dimension dynamic).

Graph breaks found with ``torch._dynamo.explain`` (torch 2.14, timm 1.0.31, CPU;
``benchmarks/bench_compile.py`` prints them again for the installed versions):
- default ``test_resnet`` classifier: none (1 graph, 0 breaks).
- ViT-S/14-shaped random ViT with SDPA: none (1 graph, 0 breaks).
- the same ViT with ``attn_impl="triton"``: none (measured on an H200 with
  ``benchmarks/gpu_check.py``, ViT-B/14: 1 graph, 0 breaks; the kernel is a
  ``torch.library.triton_op``, which Dynamo traces into and inductor compiles).
- LoRA through peft and the recipe's training loop were not run through ``explain``;
  they compile and train on CUDA (``gpu_check.py`` section 5).

``fullgraph=True`` turns any future break into an error instead of a silent
Python fallback; ``mode="reduce-overhead"`` adds CUDA graphs (GPU only; the ragged last
batch then records a second graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from roadwork_assets.core.training.config import TrainerConfig


@dataclass(frozen=True)
class CompileSettings:
    enabled: bool = False
    mode: str = "default"
    fullgraph: bool = False
    dynamic: bool | None = None

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> CompileSettings:
        return cls(enabled=cfg.compile, mode=cfg.compile_mode,
                   fullgraph=cfg.compile_fullgraph, dynamic=cfg.compile_dynamic)


def compiled(fn: Callable[..., Any], settings: CompileSettings | TrainerConfig | None
             ) -> Callable[..., Any]:
    """``fn`` under torch.compile per ``settings`` (a TrainerConfig is read for them)."""
    if isinstance(settings, TrainerConfig):
        settings = CompileSettings.from_config(settings)
    if settings is None or not settings.enabled:
        return fn
    return torch.compile(fn, mode=settings.mode, fullgraph=settings.fullgraph,
                         dynamic=settings.dynamic)


def graph_break_report(fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``torch._dynamo.explain`` summary: graphs, breaks and each break's reason."""
    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    reasons = [str(getattr(b, "reason", b)).splitlines()[0] for b in out.break_reasons]
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count,
            "ops": out.op_count, "reasons": reasons}
