"""Entry points run *outside* Dagster, as external processes launched through Dagster
Pipes (``dg.PipesSubprocessClient``), e.g. under ``torchrun``.

Why a top-level package and not ``core``: these modules import ``dagster_pipes``, the
Pipes protocol's process-side library. It does not import dagster, but it is Dagster's
wire protocol, and ``core`` is a pure library with no Dagster coupling at all
(DESIGN.md, "Layers": core holds numpy / torch / timm / peft / sklearn only). Nor can
they live in ``defs``, which imports dagster itself and would pull the whole
orchestrator into every torchrun rank. So: ``pipes_entry -> core, contracts`` and
``dagster_pipes``; ``defs`` imports an entry module only for its module path (the
torchrun command) and its message names, never to run it in the Dagster process.
"""
