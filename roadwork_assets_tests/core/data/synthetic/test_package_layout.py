"""The synthetic package's layering: each module imports only the ones below it.

Order (see the package docstring): types < palette < drawing < objects < street <
lighting < sampling < rendering < dataset. In particular sampling never imports the
renderer, and the records in `types` import nothing else from the package.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from roadwork_assets.core.data import synthetic

PACKAGE = "roadwork_assets.core.data.synthetic"
ORDER = ("types", "palette", "drawing", "objects", "street", "lighting", "sampling", "rendering", "dataset")


def _package_imports(module: str) -> set[str]:
    tree = ast.parse((Path(synthetic.__file__).parent / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            names.add(node.module.removeprefix(PACKAGE + "."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix(PACKAGE + ".") for a in node.names if a.name.startswith(PACKAGE + "."))
    return names


def test_every_module_is_listed() -> None:
    on_disk = {p.stem for p in Path(synthetic.__file__).parent.glob("*.py")} - {"__init__"}
    assert on_disk == set(ORDER)


@pytest.mark.parametrize("module", ORDER)
def test_module_imports_only_lower_layers(module: str) -> None:
    lower = set(ORDER[: ORDER.index(module)])
    assert _package_imports(module) <= lower


def test_sampling_does_not_import_the_renderer() -> None:
    assert not _package_imports("sampling") & {"rendering", "drawing"}


def test_every_sampled_item_kind_has_a_drawer_and_every_roadwork_kind_a_group() -> None:
    import numpy as np

    objects = importlib.import_module(f"{PACKAGE}.objects")
    sampling = importlib.import_module(f"{PACKAGE}.sampling")
    assert set(objects.ROADWORK_GROUPS) == set(sampling.ROADWORK_KINDS)
    kinds = set()
    for i in range(60):
        rng = np.random.default_rng(i)
        kinds |= {it.kind for it in sampling.sample_scene(rng, i % 2, 96.0).items}
    assert kinds <= set(objects.DRAW)
    assert {"cone", "car", "tree"} <= kinds


def test_public_api() -> None:
    for name in synthetic.__all__:
        assert hasattr(synthetic, name), name
