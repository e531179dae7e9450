"""On 2 gloo processes: gradient accumulation (micro-batch 2 of a per-rank batch of 4) under DDP
and FSDP2 matches one process with the whole batch of 8, and DDP skips the gradient all-reduce
on all but the last micro-batch (``no_sync``); FSDP2 trains the default way (bf16 autocast,
AdamW) like one process; a SIGTERM that reaches one rank stops both at the same step, each
after a final checkpoint."""

import datetime
import os
import signal

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from kiln.config import TrainConfig
from tests.distributed.conftest import free_port
from tests.tiny_trainer import full_params, make_trainer

STEPS, WORLD = 6, 2


def _accumulate(data: str, micro: int, rank: int) -> dict:
    trainer, model, log = make_trainer(STEPS, micro=micro, rank=rank, world=WORLD, data=data)
    reductions = []
    if data == "ddp":

        def counting_hook(state, bucket):
            reductions.append(1)
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)
    trainer.fit()
    losses = [r["loss"] for r in log["records"]]
    return {"losses": losses, "params": full_params(model), "reductions": len(reductions)}


def _bf16_adamw(rank: int = 0, world: int = 1) -> list[float]:
    cfg = TrainConfig(precision="bf16", eval_every=0, lr=1e-2)
    trainer, _, log = make_trainer(STEPS, rank=rank, world=world, adamw=True, cfg=cfg)
    trainer.fit()
    return [r["loss"] for r in log["records"]]


def _stop_on_signal(rank: int) -> dict:
    def send(record):  # only rank 1 is signalled, after its step 3
        if rank == 1 and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer, _, log = make_trainer(10, rank=rank, world=WORLD, on_record=send)
    state = trainer.fit()
    return {"step": state.step, "checkpoints": log["checkpoints"], "lines": log["lines"]}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        results = {
            (data, micro): _accumulate(data, micro, rank)
            for data in ("ddp", "fsdp")
            for micro in (4, 2)
        }
        results["bf16"] = _bf16_adamw(rank, WORLD)
        results["stop"] = _stop_on_signal(rank)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


def test_accumulation_matches_the_big_batch_and_a_signal_stops_every_rank(tmp_path):
    trainer, model, log = make_trainer(STEPS, micro=8)  # one process, no accumulation
    trainer.fit()
    want_losses, want_params = [r["loss"] for r in log["records"]], full_params(model)
    out = str(tmp_path / "results.pt")
    mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    results = ranks[0]
    for data in ("ddp", "fsdp"):
        got = results[(data, 2)]
        np.testing.assert_allclose(got["losses"], want_losses, rtol=0, atol=1e-5, err_msg=data)
        for name, value in want_params.items():
            diff = (got["params"][name] - value).abs().max().item()
            assert diff <= 1e-5, (data, name, diff)
    # two micro-batches per step, yet one all-reduce per bucket per step, as without them
    assert results[("ddp", 2)]["reductions"] == results[("ddp", 4)]["reductions"] > 0

    # FSDP2 + bf16 autocast + AdamW: the loss falls and follows one process within bf16 noise
    want_bf16 = _bf16_adamw()
    assert results["bf16"][-1] < results["bf16"][0] - 0.25, results["bf16"]
    np.testing.assert_allclose(results["bf16"], want_bf16, rtol=0, atol=0.05)

    stops = [r["stop"] for r in ranks]
    assert [s["step"] for s in stops] == [3, 3]
    assert [s["checkpoints"] for s in stops] == [[3], [3]]
    assert "Received SIGTERM at step 3: saving a final checkpoint." in stops[1]["lines"]
    assert any("at step 3: saving a final checkpoint" in line for line in stops[0]["lines"])
