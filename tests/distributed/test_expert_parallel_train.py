"""Expert parallelism in the trainer: ``parallelize_model`` + ``Trainer.fit`` with
``parallel.expert 2`` match one process with the same weights and global batch.

The real parts run: the mesh's ``ep``/``edp`` axes, experts split over ``ep`` and left out of
data parallelism (DDP or FSDP2 on the dense parameters and the router), the expert-gradient
finishing, the gradient clip over expert and dense meshes, AdamW and the MoE balancing callback
(all-reduced expert-bias update). The single process accumulates one micro-batch per rank of the
parallel run, so the balancing losses see the same tokens. fp32, 10 AdamW steps with a clip
that binds: every step's loss within 1e-5 relative, every gradient norm within 1e-5 relative
and every parameter within 1e-5.

- 2 processes, EP2 with DDP (2 accumulated micro-batches per rank) and with FSDP2 on the
  dense parameters;
- the FSDP2 run stopped after step 5 and resumed from its checkpoint (expert bias and AdamW
  state included) under EP2, and in one process (EP2 → EP1 through DCP): the resumed steps
  equal those of the run never interrupted;
- 4 processes, EP2 × 2 expert replicas with FSDP2: dense parameters sharded over 4, each
  layer's experts split over ep 2 and FSDP2-sharded over the 2 replicas (edp), stopped after
  step 5 and resumed from its checkpoint under the same layout and in one process;
- 4 processes, TP2 × EP2 (MoE layers whole on each tensor rank, experts split over ep).
"""

import numpy as np
import pytest
import torch

from kiln.config import MoEConfig, ParallelConfig, TrainConfig
from kiln.data.loader import TokenLoader, val_batches
from kiln.distributed.parallel_dims import ParallelDims
from kiln.distributed.parallelize import parallelize_model
from kiln.models.gpt import GPTConfig
from kiln.train.moe import MoEBalance
from kiln.train.optim import LRSchedule, build_optimizer
from kiln.train.plan import loop_plan
from kiln.train.trainer import Hooks, Trainer
from tests.distributed.parity import full_params, initial_model, spawn

SHAPE = GPTConfig(
    n_layers=2, d_model=32, n_heads=2, n_kv_heads=2, d_head=16, d_ffn=32, vocab_size=64,
    max_seq_len=16, position="rope", norm="rmsnorm", activation="swiglu", bias=False,
    tie_embeddings=False,
    moe=MoEConfig(experts=4, top_k=2, normalize_top_k=True, aux_loss_coef=0.01,
                  z_loss_coef=0.001, bias_update_rate=0.01, capacity_factor=1.5),
)  # fmt: skip
STEPS, BATCH, SEQ, LR, CLIP = 10, 8, 16, 3e-3, 0.5
TRAIN = TrainConfig(precision="fp32", eval_every=0, lr=LR, grad_clip=CLIP, weight_decay=0.1)


def _tokens() -> np.ndarray:
    noise = np.random.default_rng(0).integers(0, 7, 4096)
    return ((np.arange(4096) * 5 + noise) % SHAPE.vocab_size).astype(np.uint16)


def train(rank=0, world=1, data="fsdp", ep=1, micro=None, steps=STEPS, stop=None,
          save=None, load=None, tp=1, replicate=1, sp=False) -> dict:  # fmt: skip
    """Losses, gradient norms and full parameters after ``steps`` (or ``stop``) steps; ``save``
    / ``load``: a checkpoint directory written at the end / read before training."""
    from kiln.train import checkpoint as ckpt

    dims = ParallelDims(rank, world, rank, torch.device("cpu"), tp=tp, dp_replicate=replicate,
                        ep=ep)  # fmt: skip
    _ = dims.mesh
    model, seed = initial_model(SHAPE, dims)  # a layout: built on meta, allocated sharded
    layout = ParallelConfig(data=data, expert=ep, tensor=tp, sequence_parallel=sp,
                            data_replicate=replicate)  # fmt: skip
    built = parallelize_model(model, dims, layout, False, log=lambda _: None, seed=seed)
    optimizer = build_optimizer(model, TRAIN)
    records: list[dict] = []
    loader = TokenLoader(_tokens(), SEQ, BATCH, seed=0, dp_rank=dims.dp_rank, dp_size=dims.dp_size)
    trainer = Trainer(
        built, optimizer, LRSchedule(LR, 0, steps, 1.0, "linear"), loader,
        val_batches(_tokens(), SEQ, BATCH, 1), TRAIN,
        loop_plan(stop or steps, BATCH, micro or BATCH // dims.dp_size, SEQ, world), dims,
        log_every=1, hooks=Hooks(log=lambda _: None, write_metrics=records.append),
        callbacks=[MoEBalance(model, copies=tp)],
    )  # fmt: skip
    if load is not None:
        ckpt.load_checkpoint(ckpt.latest_checkpoint(load), [model], optimizer)
        meta = ckpt.read_meta(ckpt.latest_checkpoint(load))
        trainer.state.load_state_dict(meta["trainer"])
        loader.load_state_dict(meta["loader"])
    trainer.fit()
    if save is not None:
        meta = {"model_shape": __import__("dataclasses").asdict(SHAPE), "loader":
                loader.state_dict(), "trainer": trainer.state.state_dict()}  # fmt: skip
        ckpt.save_checkpoint(save, trainer.state.step, [model], optimizer, meta)
    w1 = model.blocks["0"].mlp.experts.w1
    local = w1.to_local() if hasattr(w1, "to_local") else w1
    return {
        "loss": [r["loss"] for r in records],
        "norm": [r["grad_norm"] for r in records],
        "load": [r["moe_load_max.0"] for r in records],
        "params": full_params(model),
        "experts": {"local": tuple(local.shape), "global": tuple(w1.shape)},
    }


def _assert_match(got: dict, want: dict, label: str) -> None:
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=0, err_msg=label)
    np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-5, atol=0, err_msg=label)
    if "load" in got:  # tokens routed per expert per step, as one process counts them
        np.testing.assert_allclose(got["load"], want["load"], rtol=1e-5, err_msg=label)
    assert got["params"].keys() == want["params"].keys(), label
    for name, value in want["params"].items():
        diff = (got["params"][name] - value).abs().max().item()
        assert diff <= 1e-5, (label, name, diff)


def _joined(first: dict, second: dict) -> dict:
    """One run's record from a run stopped half-way and its resumption."""
    return {k: first[k] + second[k] for k in ("loss", "norm")} | {"params": second["params"]}


def _two(rank, world, root):
    half = STEPS // 2
    first = train(rank, world, "fsdp", ep=2, stop=half, save=root / "ckpt")
    resumed = train(rank, world, "fsdp", ep=2, load=root / "ckpt")
    ddp = train(rank, world, "ddp", ep=2, micro=BATCH // 4)  # 2 accumulated micro-batches
    return {"ddp": ddp, "fsdp, resumed": _joined(first, resumed)}


@pytest.mark.timeout(600)
def test_ep2_with_ddp_and_fsdp_matches_one_process_and_resumes_in_one(tmp_path):
    """EP2 (DDP; FSDP2 stopped at step 5, checkpointed, resumed under EP2) equals one process;
    the EP2 checkpoint resumed in one process (EP1) continues the same way."""
    import functools

    want = train(micro=BATCH // 2)
    assert min(want["norm"]) > CLIP  # the clip binds at every step
    assert np.ptp(want["loss"]) > 1e-3
    bias = want["params"]["blocks.0.mlp.router.expert_bias"]
    assert bias.abs().sum() > 0  # the expert-bias update ran
    got = spawn(functools.partial(_two, root=tmp_path), 2, str(tmp_path / "out.pt"))
    _assert_match(got["ddp"], train(micro=BATCH // 4), "EP2 + DDP, accumulating")
    _assert_match(got["fsdp, resumed"], want, "EP2 + FSDP2, resumed")
    half = STEPS // 2
    ep1 = train(micro=BATCH // 2, load=tmp_path / "ckpt")
    _assert_match(_joined({"loss": want["loss"][:half], "norm": want["norm"][:half]}, ep1),
                  want, "EP2 checkpoint resumed in one process")  # fmt: skip


def _four(rank, world, root):
    first = train(rank, world, "fsdp", ep=2, stop=STEPS // 2, save=root / "ckpt")
    layer = first["experts"]
    resumed = _joined(first, train(rank, world, "fsdp", ep=2, load=root / "ckpt")) | layer
    hsdp = train(rank, world, "fsdp", ep=2, replicate=2)
    hsdp |= hsdp["experts"]
    tp = {f"tp2xep2{' sp' * sp}": train(rank, world, "fsdp", ep=2, tp=2, sp=sp) for sp in (0, 1)}
    return {"ep2x2": resumed, **tp, "hsdp": hsdp}


@pytest.mark.timeout(600)
def test_four_processes_ep2_with_sharded_expert_replicas_and_with_tensor_parallel(tmp_path):
    """4 processes, three layouts, each equal to one process:

    - EP2 × 2 replicas: dense parameters FSDP2-sharded over 4, experts split over ep 2 and
      FSDP2-sharded over each pair of replicas (edp); its step-5 checkpoint resumes under the
      same layout and in one process;
    - TP2 × EP2, without and with sequence parallelism: attention tensor-parallel over 2 ranks,
      each MoE layer whole on both (under SP its input gathered along the sequence, each rank
      keeping its half of the output) with its experts split over the 2 data-parallel ranks of
      the same tensor coordinate, dense parameters FSDP2-sharded over those 2;
    - HSDP × EP2 (data_replicate 2): dense parameters sharded over 2 and replicated over 2,
      experts split over ep 2 (borrowed from the shard ranks) and FSDP2-sharded over the
      replicas (edp spans the replicate axis)."""
    import functools

    want = train(micro=BATCH // 4)
    both = spawn(functools.partial(_four, root=tmp_path), 4, str(tmp_path / "out.pt"))
    got = both["ep2x2"]
    assert got["local"][0] * 4 == got["global"][0]  # 1 of 4 experts per rank: ep 2 × edp 2
    _assert_match(got, want, "EP2 x 2 replicas, experts sharded over them, resumed")
    half = STEPS // 2
    one = train(micro=BATCH // 4, load=tmp_path / "ckpt")
    _assert_match(_joined({"loss": want["loss"][:half], "norm": want["norm"][:half]}, one),
                  want, "EP2 x 2 checkpoint resumed in one process")  # fmt: skip
    tp_want = train(micro=BATCH // 2)
    _assert_match(both["tp2xep2"], tp_want, "TP2 x EP2")
    _assert_match(both["tp2xep2 sp"], tp_want, "TP2 (sequence parallel) x EP2")
    assert both["hsdp"]["local"][0] * 4 == both["hsdp"]["global"][0]
    _assert_match(both["hsdp"], want, "HSDP 2x2 x EP2")
