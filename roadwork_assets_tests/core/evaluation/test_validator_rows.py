"""The validator simulator's rows in the test report: subsampling, the table, the line
`roadwork run` prints."""

from __future__ import annotations

import numpy as np
from PIL import Image

from roadwork_assets.contracts.validator_schemas import ValidatorSimulation
from roadwork_assets.core.evaluation.validator_rows import (
    closing_line,
    rows_table,
    sample_by_group,
    simulate_rows,
)


def _groups(sizes):
    return [f"g{k}" for k, n in enumerate(sizes) for _ in range(n)]


def test_sample_by_group_takes_whole_groups_up_to_the_cap_and_is_seeded():
    groups = _groups([3, 1, 4, 2, 5, 1, 2, 2, 6])
    idx = sample_by_group(groups, 10, seed=0)
    assert idx.size == 10 and np.all(np.diff(idx) > 0)
    taken = {groups[i] for i in idx}
    assert sum(groups.count(g) for g in taken) == idx.size  # no group is split
    assert np.array_equal(idx, sample_by_group(groups, 10, seed=0))
    assert any(not np.array_equal(idx, sample_by_group(groups, 10, seed=s)) for s in range(1, 5))
    assert np.array_equal(sample_by_group(groups, 100, seed=0), np.arange(len(groups)))
    assert sample_by_group(_groups([7]), 3, seed=0).size == 3  # one giant group: a part of it


def _png(tmp_path, k: int, value: int) -> str:
    path = tmp_path / f"{k}.png"
    Image.fromarray(np.full((40, 60, 3), value, np.uint8)).save(path)
    return str(path)


def test_rows_answer_the_same_images_and_read_as_a_table_and_a_line(tmp_path):
    labels = np.array([0, 1] * 6)
    uris = [_png(tmp_path, k, 40 + 190 * y) for k, y in enumerate(labels)]  # dark / bright

    def brightness(images):  # 95th percentile: rotation's black corners do not move it
        return np.array([np.percentile(np.asarray(im), 95) / 255.0 for im in images])

    sim = simulate_rows(uris, [f"i{k}" for k in range(12)], labels, _groups([2] * 6),
                        {"bright": ("mean brightness", brightness),
                         "constant": ("always 0.3", lambda ims: np.full(len(ims), 0.3))},
                        max_images=8, seed=1, n_windows=2000)
    assert isinstance(sim, ValidatorSimulation)
    assert (sim.n_images, sim.n_available, sim.n_groups, sim.max_images) == (8, 12, 4, 8)
    bright, constant = sim.row("bright"), sim.row("constant")
    assert bright.reward.mean > 0.9 and bright.per_level[0].mcc == 1.0
    assert constant.reward.expected < 0.03 and constant.per_level[0].tnr == 1.0
    table = rows_table(sim)
    assert table.count("\n| ") == 2 and "| bright |" in table and "L3 MCC / acc" in table
    line = closing_line(sim)
    assert line.startswith("validator reward (simulated, L0-L3): bright 1.000 [1.000, 1.000]; ")
    assert "; constant 0.0" in line and "(8 val_test images, flips=True)" in line
