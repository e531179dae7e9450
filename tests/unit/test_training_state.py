"""The registry of stateful parts (kiln.train.state): a registered part round-trips through a
checkpoint, each kind of state lands where the checkpoint layout says, and a part a checkpoint
holds nothing for is refused in one sentence before anything loads."""

import json

import pytest
import torch

from kiln.errors import CheckpointError
from kiln.train import checkpoint as ckpt
from kiln.train.state import CPURng, ModelParts, TrainingState


class Bias:
    """A new kind of state (as an MoE expert bias would be): a tensor and a plain counter."""

    def __init__(self, value: float = 0.0):
        self.bias, self.updates = torch.full((4,), value), 0

    def state_dict(self):
        return {"bias": self.bias.clone(), "updates": self.updates}

    def load_state_dict(self, state):
        self.bias, self.updates = state["bias"].clone(), state["updates"]


class Counter:
    """Plain values only (as the trainer's counters)."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum buffers exist
    return model, opt


def _registry(model, opt, *extra_parts) -> TrainingState:
    state = TrainingState()
    state.register("model", ModelParts([model], opt), dcp=(), json=None)
    state.register("rng", CPURng(), dcp=("extra",), json=None)
    for name, part, where in extra_parts:
        state.register(name, part, **where)
    return state


def test_a_registered_part_round_trips(tmp_path):
    model, opt = _parts(0)
    bias, counter = Bias(1.5), Counter()
    bias.updates, counter.step = 7, 12
    parts = [("bias", bias, {}), ("trainer", counter, {"dcp": None})]
    saved = _registry(model, opt, *parts).save(tmp_path, 3, keep=2, facts={"model_shape": {}})
    rng = torch.get_rng_state()

    # the places the checkpoint layout promises (what older checkpoints hold too)
    stored = ckpt.stored_keys(saved)
    assert {"model.weight", "extra.rng_cpu", "extra.bias.bias"} <= stored
    assert any(k.startswith("optim.state.weight.momentum_buffer") for k in stored)
    meta = json.loads((saved / ckpt.META).read_text())
    assert meta["bias"] == {"updates": 7} and meta["trainer"] == {"step": 12}

    model2, opt2 = _parts(1)
    bias2, counter2 = Bias(0.0), Counter()
    torch.rand(5)  # moves the RNG on
    parts2 = [("bias", bias2, {}), ("trainer", counter2, {"dcp": None})]
    _registry(model2, opt2, *parts2).restore(saved)
    assert torch.equal(bias2.bias, bias.bias) and bias2.updates == 7 and counter2.step == 12
    assert torch.equal(torch.get_rng_state(), rng)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


@pytest.mark.parametrize(
    "where, missing",
    [({}, "bias in kiln.json"), ({"json": None}, "extra.bias.bias in its tensors")],
    ids=["tensors-and-values", "tensors-only"],
)
def test_a_part_missing_from_the_checkpoint_is_refused(tmp_path, where, missing):
    model, opt = _parts(0)
    saved = _registry(model, opt).save(tmp_path, 1, keep=1, facts={"model_shape": {}})
    model2, opt2 = _parts(1)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(CheckpointError) as info:
        _registry(model2, opt2, ("bias", Bias(), where)).restore(saved)
    message = str(info.value)
    assert message == (
        f"Checkpoint {saved} holds no state for this run's 'bias' ({missing} is missing); "
        "resume it with the config it was trained with."
    )
    assert "\n" not in message
    assert all(torch.equal(p, b) for p, b in zip(model2.parameters(), before))  # nothing loaded


def test_two_parts_may_not_share_a_name_or_a_place(tmp_path):
    model, opt = _parts(0)
    state = _registry(model, opt, ("bias", Bias(), {}))
    with pytest.raises(ValueError, match="already registered"):
        state.register("bias", Bias())
    state.register("bias2", Bias(), dcp=("extra", "bias"), json=None)
    with pytest.raises(ValueError, match="extra.bias.bias"):
        state.save(tmp_path, 1, keep=1, facts={})
    with pytest.raises(TypeError, match="no state_dict"):
        state.register("plain", object())


def test_a_shape_saved_before_a_field_existed_is_the_same_shape():
    """Checkpoints written before qk_norm, qkv_bias and moe.shared_gate existed still resume;
    a changed value or an unknown field does not."""
    import dataclasses

    from kiln.config import MoEConfig
    from kiln.models.gpt import GPTConfig
    from kiln.train.state import same_model_shape

    shape = GPTConfig(n_layers=1, d_model=8, n_heads=2, n_kv_heads=2, d_head=4, d_ffn=16,
                      vocab_size=10, max_seq_len=4, moe=MoEConfig(experts=2, top_k=1))  # fmt: skip
    now = dataclasses.asdict(shape)
    old = {k: v for k, v in now.items() if k not in ("qk_norm", "qkv_bias")}
    old["moe"] = {k: v for k, v in now["moe"].items() if k != "shared_gate"}
    assert same_model_shape(old, now)
    assert not same_model_shape(old | {"d_ffn": 32}, now)
    assert not same_model_shape(now | {"from_the_future": 1}, now)
    assert not same_model_shape(None, now)
