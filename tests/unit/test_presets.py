"""Presets: published Cerebras-GPT sizes, resolution of overrides, user-facing errors."""

import pytest
import torch

from kiln.config import ModelConfig
from kiln.errors import ConfigError
from kiln.models.gpt import GPT
from kiln.models.presets import PRESETS, PUBLISHED_PARAMS, resolve_model

CEREBRAS = [n for n in PRESETS if n.startswith("cerebras-gpt-")]
NOMINAL = {"111m": 111e6, "256m": 256e6, "590m": 590e6, "1.3b": 1.3e9, "2.7b": 2.7e9,
           "6.7b": 6.7e9, "13b": 12.85e9}  # fmt: skip


# Cerebras-GPT (Dey et al. 2023, table 1; the released configs): layers, width, heads, d_ffn
CEREBRAS_SHAPES = {
    "111m": (10, 768, 12, 3072), "256m": (14, 1088, 17, 4352), "590m": (18, 1536, 12, 6144),
    "1.3b": (24, 2048, 16, 8192), "2.7b": (32, 2560, 32, 10240), "6.7b": (32, 4096, 32, 16384),
    "13b": (40, 5120, 40, 20480),
}  # fmt: skip


def test_seven_cerebras_presets_have_the_published_shapes():
    assert sorted(CEREBRAS) == sorted(f"cerebras-gpt-{s}" for s in CEREBRAS_SHAPES)
    for size, (layers, width, heads, ffn) in CEREBRAS_SHAPES.items():
        cfg = PRESETS[f"cerebras-gpt-{size}"]
        got = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.d_head * cfg.n_heads)
        assert got == (layers, width, heads, ffn, width), size
        assert (cfg.vocab_size, cfg.max_seq_len, cfg.position) == (50257, 2048, "learned")
        assert (cfg.norm, cfg.activation, cfg.tie_embeddings) == ("layernorm", "gelu", True)


@pytest.mark.parametrize("name", CEREBRAS + ["smollm2-135m"])
def test_param_counts_match_published(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = GPT(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == cfg.num_params()
    assert abs(counted / PUBLISHED_PARAMS[name] - 1) < 0.01
    print(f"{name}: {counted / 1e6:.1f}M total, {cfg.num_params(False) / 1e6:.1f}M non-embedding")


@pytest.mark.parametrize("name", CEREBRAS)
def test_names_round_the_true_size(name):
    """The names are rounded (GPT-3 convention): "2.7B" holds 2.65e9, within 2%."""
    assert abs(PRESETS[name].num_params() / NOMINAL[name.split("-")[-1]] - 1) < 0.02


def test_non_embedding_count_excludes_tables_but_not_untied_head():
    cfg = PRESETS["llama-tiny"]
    assert cfg.num_params() - cfg.num_params(False) == cfg.vocab_size * cfg.d_model
    cfg = PRESETS["tiny"]
    tables = (cfg.vocab_size + cfg.max_seq_len) * cfg.d_model
    assert cfg.num_params() - cfg.num_params(False) == tables


def test_unknown_preset_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'cerebras-gpt-111m'"):
        resolve_model(ModelConfig(preset="cerebras-gpt-111"), None)


def test_vocab_follows_tokenizer_with_note():
    cfg, notes = resolve_model(ModelConfig(preset="cerebras-gpt-111m"), 4096)
    assert cfg.vocab_size == 4096
    assert notes == [
        "vocab_size 4096 follows the tokenizer (preset cerebras-gpt-111m publishes 50257)"
    ]
    cfg, notes = resolve_model(ModelConfig(preset="tiny"), 4096)
    assert notes == []


def test_overrides_rederive_head_width_and_kv_heads():
    cfg, _ = resolve_model(ModelConfig(preset="llama-tiny", d_model=128, n_heads=8), None)
    assert (cfg.d_head, cfg.n_kv_heads) == (16, 8)
    cfg, _ = resolve_model(ModelConfig(preset="llama-tiny", d_model=128), None)
    assert (cfg.d_head, cfg.n_kv_heads) == (32, 2)
    cfg, _ = resolve_model(ModelConfig(preset="tiny", d_model=128, d_head=48), None)
    assert cfg.d_head == 48


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="model.n_heads 5 does not divide model.d_model 256"):
        resolve_model(ModelConfig(preset="tiny", n_heads=5), None)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="n_kv_heads 3 does not divide model.n_heads 4"):
        resolve_model(ModelConfig(preset="tiny", n_kv_heads=3), None)


def test_bad_rope_scaling_is_a_config_error():
    cfg = PRESETS["llama-tiny"].replace(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="missing high_freq_factor"):
        cfg.validate()


def test_qk_norm_and_qkv_bias_are_model_flags(capsys):
    """--model.qk_norm / --model.qkv_bias reach the built shape (a from-scratch Qwen3-style or
    Qwen2-style model); an unknown qk_norm is one sentence at parse time, exit code 2."""
    from kiln.cli import main, parse_job

    job = parse_job(["--model.preset", "tiny", "--model.qk_norm", "head",
                     "--model.qkv_bias", "true", "--model.bias", "false"]).job  # fmt: skip
    shape, _ = resolve_model(job.model)
    assert (shape.qk_norm, shape.qkv_bias, shape.bias) == ("head", True, False)
    names = {n for n, _ in GPT(shape).named_parameters()}
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.wq.bias"} <= names
    assert "blocks.0.attn.wo.bias" not in names
    default, _ = resolve_model(parse_job([])[0].model)  # unset: the preset's
    assert (default.qk_norm, default.qkv_bias) == ("none", False)
    assert main(["estimate-memory", "--model.qk_norm", "rms"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("model.qk_norm is 'rms' but must be one of none, head, full.")
