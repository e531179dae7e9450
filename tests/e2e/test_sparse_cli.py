"""Sparse training through `kiln train`: resume equals the uninterrupted run bitwise, exports
keep the zeros, and bad sparsity settings exit 2 with one sentence."""

import json
import shutil

import pytest
import torch

from kiln.train.checkpoint import read_tensors
from tests.e2e.helpers import kiln, tiny_flags

SPARSE = [
    "--sparsity.level", "0.75", "--sparsity.pattern", "unstructured",
    "--sparsity.algorithm", "rigl", "--sparsity.update_every", "3", "--sparsity.stop_step", "18",
    "--log.tensorboard", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory, corpus, kiln_env):
    run = tmp_path_factory.mktemp("sparse") / "run"
    result = kiln(["train", *tiny_flags(run, corpus, steps=20), *SPARSE], kiln_env)
    assert result.returncode == 0, result.stderr
    assert "sparsity: 12 matrices, rigl" in result.stdout
    return run


def test_resumed_sparse_run_equals_uninterrupted(sparse_run, tmp_path, kiln_env):
    copy = tmp_path / "copy"
    shutil.copytree(sparse_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000020")  # resume from step 10
    result = kiln(["train", "--run.dir", str(copy), "--resume"], kiln_env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    full = read_tensors(sparse_run / "checkpoints" / "step-0000020")
    resumed = read_tensors(copy / "checkpoints" / "step-0000020")
    assert full.keys() == resumed.keys()
    masks = [k for k in full if k.startswith("extra.cb.sparsity.mask.")]
    assert len(masks) == 12
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for key in masks:  # zeros survive: weights and Adam moments are zero outside the mask
        name = key[len("extra.cb.sparsity.mask.") :]
        off = ~full[key].bool()
        assert off.float().mean().item() == pytest.approx(0.75, abs=0.01)
        assert torch.all(full[f"model.{name}"][off] == 0)
        assert torch.all(full[f"optim.state.{name}.exp_avg"][off] == 0)
        assert torch.all(full[f"optim.state.{name}.exp_avg_sq"][off] == 0)
    lines = [json.loads(x) for x in (sparse_run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["sparsity"] == pytest.approx(0.75, abs=0.01)
    assert lines[-1]["flops_per_token_sparse"] < lines[-1]["flops_per_token_dense"]


def test_sparse_model_exports_with_zeros_and_masks(sparse_run, tmp_path, kiln_env):
    from safetensors.torch import load_file

    from kiln.train.load import load_kiln

    out = tmp_path / "masks.safetensors"
    result = kiln(["sparsity", "export-masks", str(sparse_run), str(out)], kiln_env)
    assert result.returncode == 0, result.stderr
    masks = load_file(out)
    model = load_kiln(sparse_run).model  # a plain dense GPT: the zeros are ordinary weights
    params = dict(model.named_parameters())
    assert len(masks) == 12
    for name, mask in masks.items():
        assert torch.all(params[name][mask == 0] == 0), name
    again = kiln(["sparsity", "export-masks", str(sparse_run), str(out)], kiln_env)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--sparsity.level", "1.0"], "sparsity.level is 1.0 but must be in [0, 1)"),
        (["--sparsity.level", "0.5", "--sparsity.pattern", "5:4"], "N <= M"),
        (["--sparsity.level", "0.5", "--sparsity.block_size", "48"], "does not divide"),
        (["--sparsity.per_param", '{"blocks.*.nope": 0.5}'], "matches no parameter"),
    ],
)
def test_bad_sparsity_flags_exit_2(flags, fragment, tmp_path, corpus, kiln_env):
    result = kiln(["train", *tiny_flags(tmp_path / "run", corpus, steps=2), *flags], kiln_env)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and fragment in line, result.stderr


def test_same_command_plus_resume_continues_a_sparse_run(sparse_run, tmp_path, corpus, kiln_env,
                                                         capsys, monkeypatch):  # fmt: skip
    """The command that started the run, repeated with --resume (a re-submitted job script);
    a sparsity flag that would change the run is refused naming the saved and given value."""
    from kiln.cli import main

    copy = tmp_path / "same"
    shutil.copytree(sparse_run, copy)
    argv = ["train", *tiny_flags(copy, corpus, steps=20), *SPARSE, "--resume"]
    result = kiln(argv, kiln_env)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "step-0000020" in result.stdout
    monkeypatch.setenv("KILN_CACHE", kiln_env["KILN_CACHE"])
    assert main([*argv, "--sparsity.level", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "sparsity.level is 0.75, so --sparsity.level 0.5 cannot be given" in err
