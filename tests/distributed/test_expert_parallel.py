"""Expert parallelism on 2 gloo processes matches one process with the same weights and batch.

EP2: each rank holds 2 of the 4 experts of every MoE layer and half of the global batch; tokens
go to their experts' rank and back through uneven all-to-alls. The control is one process
running the two halves as two accumulated micro-batches (what data parallelism computes,
balancing losses included). Plain SGD (STYLE), fp32, 10 steps: every step's loss and all
parameters after them agree within 1e-5; the expert-bias update (all-reduced load) too. A
second case routes every token to rank 0's experts and gives rank 1 no tokens at all.
"""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import MoEConfig
from kiln.distributed.expert_parallel import apply_expert_parallel, finish_expert_grads
from kiln.models.gpt import GPT, GPTConfig
from kiln.models.moe import pop_aux_loss
from kiln.train.moe import MoEBalance
from tests.distributed.conftest import free_port

SHAPE = GPTConfig(
    n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=48, vocab_size=64,
    max_seq_len=16, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
    tie_embeddings=False,
    moe=MoEConfig(experts=4, top_k=2, normalize_top_k=True, aux_loss_coef=0.01,
                  z_loss_coef=0.001, bias_update_rate=0.01, capacity_factor=1.5),
)  # fmt: skip
STEPS, BATCH, SEQ, WORLD = 10, 4, 16, 2


def _meta(model) -> dict:
    """What kiln train writes into kiln.json (a checkpoint without it counts as damaged)."""
    import dataclasses

    return {"step": 2, "model_shape": dataclasses.asdict(model.config)}


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 64, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def _model():
    torch.manual_seed(0)
    return GPT(SHAPE)


def _full_state(model, rank, world):
    """Every parameter and buffer, experts gathered back to [E, ...] on every rank."""
    return {
        name: (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
        for name, t in model.state_dict().items()
    }


def run(rank: int = 0, world: int = 1):
    model = _model()
    if world > 1:
        apply_expert_parallel(model, dist.group.WORLD, log=lambda _: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    balance = MoEBalance(model)
    losses = []
    for batch in _batches():
        halves = batch.chunk(WORLD)
        mine = [halves[rank]] if world > 1 else halves
        total = 0.0
        for part in mine:
            loss = model(part[:, :-1], targets=part[:, 1:]) + pop_aux_loss(model)
            (loss / len(mine)).backward()
            total += loss.item() / len(mine)
        if world > 1:
            _sync_grads(model, world)
            t = torch.tensor([total])
            dist.all_reduce(t)
            total = t.item() / world
        opt.step()
        opt.zero_grad()
        balance.after_optimizer_step(0)
        losses.append(total)
    return losses, _full_state(model, rank, world)


def _sync_grads(model, world):
    """Data parallel over the ep ranks: dense gradients averaged, expert ones finished."""
    for name, p in model.named_parameters():
        if ".experts." not in name:
            dist.all_reduce(p.grad)
            p.grad /= world
    finish_expert_grads(model, dp_size=world)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        losses, state = run(rank, WORLD)
        zero = _zero_token_rank(rank)
        if rank == 0:
            torch.save({"losses": losses, "state": state, "zero": zero}, out)
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


def _zero_token_rank(rank):
    """Every token prefers experts 0-1 (rank 0's); rank 1 also brings no tokens of its own."""
    model = _model()
    layer = model.blocks["0"].mlp
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, -100.0, -100.0]))
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(1))
    ref = layer(x)
    if dist.is_initialized():
        apply_expert_parallel(model, dist.group.WORLD, log=lambda _: None)
    mine = x if rank == 0 else x[:0]
    mine = mine.clone().requires_grad_(True)
    y = layer(mine)
    y.square().sum().backward()
    grads = [p.grad for p in layer.experts.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return (y.detach() - ref[: len(mine)].detach()).abs().max().item() if len(mine) else 0.0


@pytest.mark.timeout(300)
def test_ep2_matches_one_process(tmp_path):
    out = tmp_path / "ep.pt"
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    got = torch.load(out)
    losses, state = run()
    assert max(abs(a - b) for a, b in zip(got["losses"], losses)) < 1e-5
    for name, t in state.items():
        assert (got["state"][name] - t).abs().max().item() < 1e-5, name
    bias = state["blocks.0.mlp.router.expert_bias"]
    assert bias.abs().sum() > 0  # the all-reduced bias update really ran
    assert got["zero"] < 1e-5


def _adam_state(model, opt):
    """{param name: (exp_avg, exp_avg_sq)} as full tensors."""
    names = {id(p): n for n, p in model.named_parameters()}
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()  # noqa: E731
    return {names[id(p)]: (full(s["exp_avg"]), full(s["exp_avg_sq"])) for p, s in opt.state.items()}


def _reshard_worker(rank, port, root, phase):
    from kiln.train import checkpoint as ckpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        model = _model()
        apply_expert_parallel(model, dist.group.WORLD, log=lambda _: None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        if phase == "save":  # two EP2 steps, then an EP2 checkpoint
            for batch in _batches()[:2]:
                part = batch.chunk(WORLD)[rank]
                (model(part[:, :-1], targets=part[:, 1:]) + pop_aux_loss(model)).backward()
                _sync_grads(model, WORLD)
                opt.step()
                opt.zero_grad()
            ckpt.save_checkpoint(root / "ep2", 2, model, opt, _meta(model))
        else:  # load the EP1 checkpoint into EP2
            model.blocks["0"].mlp.router.expert_bias.fill_(7.0)
            opt.step()  # creates (zero) state to load into
            ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "ep1"), model, opt)
        state = {"params": _full_state(model, rank, WORLD), "adam": _adam_state(model, opt)}
        if rank == 0:
            torch.save(state, root / f"{phase}.pt")
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_checkpoints_reshard_ep2_to_ep1_to_ep2_with_optimizer_state(tmp_path):
    from kiln.train import checkpoint as ckpt

    mp.start_processes(_reshard_worker, args=(free_port(), tmp_path, "save"), nprocs=WORLD,
                       start_method="spawn")  # fmt: skip
    saved = torch.load(tmp_path / "save.pt")
    model = _model()  # EP1: one process holds all experts
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ep2"), model, opt)
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved["params"][name]), name
    for name, (m, v) in _adam_state(model, opt).items():
        assert torch.equal(m, saved["adam"][name][0]) and torch.equal(v, saved["adam"][name][1])
    ckpt.save_checkpoint(tmp_path / "ep1", 2, model, opt, _meta(model))
    mp.start_processes(_reshard_worker, args=(free_port(), tmp_path, "load"), nprocs=WORLD,
                       start_method="spawn")  # fmt: skip
    loaded = torch.load(tmp_path / "load.pt")
    for name, t in saved["params"].items():
        assert torch.equal(loaded["params"][name], t), name
    for name, (m, v) in saved["adam"].items():
        assert torch.equal(loaded["adam"][name][0], m) and torch.equal(loaded["adam"][name][1], v)
