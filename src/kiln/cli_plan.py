"""The ``kiln`` verbs that plan and run experiments: plan (with --cluster layouts), scale, mup."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kiln.cli_args import FRACTION, NON_NEGATIVE, POSITIVE, SEED, _number, _numbers, _parse, _parser
from kiln.errors import ConfigError


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
