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
- 4 processes, EP2 × 2 expert replicas with FSDP2 (dense sharded over 4, experts over 2 and
  their gradients summed over the replica pairs).
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
          save=None, load=None) -> dict:  # fmt: skip
    """Losses, gradient norms and full parameters after ``steps`` (or ``stop``) steps; ``save``
    / ``load``: a checkpoint directory written at the end / read before training."""
    from kiln.train import checkpoint as ckpt

    dims = ParallelDims(rank, world, rank, torch.device("cpu"), ep=ep)
    _ = dims.mesh
    model, seed = initial_model(SHAPE, dims)  # a layout: built on meta, allocated sharded
    built = parallelize_model(model, dims, ParallelConfig(data=data, expert=ep), False,
                              log=lambda _: None, seed=seed)  # fmt: skip
    optimizer = build_optimizer(model, TRAIN)
    records: list[dict] = []
    loader = TokenLoader(_tokens(), SEQ, BATCH, seed=0, dp_rank=dims.dp_rank, dp_size=world)
    trainer = Trainer(
        built, optimizer, LRSchedule(LR, 0, steps, 1.0, "linear"), loader,
        val_batches(_tokens(), SEQ, BATCH, 1), TRAIN,
        loop_plan(stop or steps, BATCH, micro or BATCH // world, SEQ, world), dims, log_every=1,
        hooks=Hooks(log=lambda _: None, write_metrics=records.append),
        callbacks=[MoEBalance(model)],
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
    return {
        "loss": [r["loss"] for r in records],
        "norm": [r["grad_norm"] for r in records],
        "params": full_params(model),
    }


def _assert_match(got: dict, want: dict, label: str) -> None:
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=0, err_msg=label)
    np.testing.assert_allclose(got["norm"], want["norm"], rtol=1e-5, atol=0, err_msg=label)
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


def _four(rank, world):
    return train(rank, world, "fsdp", ep=2)


@pytest.mark.timeout(600)
def test_ep2_times_two_replicas_with_fsdp_matches_one_process(tmp_path):
    """4 processes: dense parameters FSDP2-sharded over 4, experts split over ep 2 and whole on
    each pair of replicas (their gradients summed over the pair)."""
    _assert_match(spawn(_four, 4, str(tmp_path / "out.pt")), train(micro=BATCH // 4), "EP2x2")
