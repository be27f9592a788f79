"""DistributedDataParallel training on 2 CPU processes (Gloo): both ranks end with identical weights."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from derestainer.core.device import resolve_device
from derestainer.training.distributed import DistEnv, free_port, init_distributed
from test_train import tiny_cfg, write_pairs


def _rank_main(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from derestainer.training.loop import Trainer

    cfg = tiny_cfg(Path(data), Path(out) / "run", steps=3, grad_accum=2, ckpt_every=3, log_every=1)
    tr = Trainer(cfg)
    assert tr.env.distributed and tr.env.backend == "gloo" and tr.env.rank == rank
    init = {k: v.detach().clone() for k, v in tr.generator.named_parameters()}
    first_batch = next(tr._batches())["name"]
    tr.state.epoch, tr.state.batch_in_epoch = 0, 0  # undo the peek
    tr.run()
    params = {f"g.{k}": v.detach().clone() for k, v in tr.generator.named_parameters()}
    params.update({f"d.{k}": v.detach().clone() for k, v in tr.discriminator.named_parameters()})
    moved = sum(float((params[f"g.{k}"] - v).abs().max()) for k, v in init.items())
    save_file(params, str(Path(out) / f"rank{rank}.safetensors"),
              metadata={"first_batch": ",".join(first_batch), "moved": str(moved)})


def test_two_gloo_ranks_hold_identical_weights(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "d", n_train=8, n_test=2)
    ctx = mp.spawn(_rank_main, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed
            assert time.monotonic() < deadline, "the 2-rank run hangs (mismatched collectives?)"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    from safetensors import safe_open

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and len(w0) > 10
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    metas = []
    for r in (0, 1):
        with safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt") as f:
            metas.append(f.metadata())
    # the ranks trained on different shards, and training changed the weights
    assert set(metas[0]["first_batch"].split(",")).isdisjoint(metas[1]["first_batch"].split(","))
    assert float(metas[0]["moved"]) > 0
    # only rank 0 wrote the run folder's files
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-0000003" / "generator.safetensors").is_file()
    # but the checkpoint holds every rank's RNG states, in rank order
    import json

    rng = json.loads((run / "checkpoints" / "step-0000003" / "state.json").read_text())["rng"]
    assert isinstance(rng, list) and len(rng) == 2 and all({"python", "numpy", "torch"} <= set(r) for r in rng)
    assert (run / "log.jsonl").is_file()


def test_plain_launch_is_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv(0, 1, 0, torch.device("cpu"), None) and env.is_main and not env.distributed
    assert not dist.is_initialized()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
