"""core.training.distributed with a real two-rank gloo process group (two processes on
CPU, as torchrun would start them): each rank's slice of an epoch, and DDP keeping the
replicas identical after a step on different data."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from roadwork_assets.core.training import distributed

WORLD = 2


def _rank_main(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        order = torch.tensor([5, 3, 0, 6, 1, 4, 2])  # 7 rows: one rank is padded
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        ddp = distributed.wrap(model, torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.full((4, 3), float(rank + 1))  # each rank its own batch
        ddp(x).pow(2).sum().backward()
        opt.step()
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "shard": distributed.shard(order).tolist(), "shard_len": distributed.shard_len(7),
            "world": distributed.world_size(), "rank": distributed.rank(),
            "wrapped": type(ddp).__name__,
            "weight": model.weight.detach().flatten().tolist()}))
    finally:
        distributed.shutdown()


def test_two_ranks_split_each_epoch_and_keep_replicas_identical(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, WORLD)
    assert r0["wrapped"] == "DistributedDataParallel"
    # order[rank::2] after padding with its own first row: equal lengths, all rows seen
    assert r0["shard"] == [5, 0, 1, 2] and r1["shard"] == [3, 6, 4, 5]
    assert r0["shard_len"] == 4
    # different data per rank, one averaged gradient: the replicas are still equal
    assert r0["weight"] == r1["weight"]
    # and they equal one model stepped on the mean of the two ranks' gradients
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    grads = []
    for rank in range(WORLD):
        model.zero_grad()
        model(torch.full((4, 3), float(rank + 1))).pow(2).sum().backward()
        grads.append(model.weight.grad.clone())
    expected = model.weight.detach() - 0.5 * (grads[0] + grads[1]) / 2
    torch.testing.assert_close(torch.tensor(r0["weight"]), expected.flatten())


def test_outside_torchrun_everything_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    order = torch.arange(5)
    model = torch.nn.Linear(2, 2)
    assert distributed.init_from_env() is None and not distributed.active()
    assert distributed.wrap(model, torch.device("cpu")) is model
    assert distributed.shard(order) is order and distributed.shard_len(5) == 5
    assert (distributed.rank(), distributed.world_size(), distributed.backend()) == (0, 1, "none")


def test_more_ranks_than_gpus_is_refused_naming_the_setting(monkeypatch):
    from roadwork_assets.contracts.errors import BadInputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    try:
        distributed.init_from_env()
    except BadInputError as exc:
        assert "local rank 1" in str(exc) and "1 GPU(s)" in str(exc)
        assert "trainer.nproc_per_node <= 1" in str(exc)
    else:
        raise AssertionError("a rank without a GPU must be refused")
    assert not distributed.active()  # refused before any process group was started
