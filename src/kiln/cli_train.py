"""The ``kiln`` verbs that take ``kiln train``'s flags: train, estimate-memory, perf."""

from __future__ import annotations

import os
import sys

from kiln.cli_args import POSITIVE, Option, parse_job


def cmd_train(argv: list[str]) -> int:
    """Exit 0, 2 (bad input, or a damaged checkpoint: one sentence), 1 (a rank was lost),
    3 (a checkpoint could not be written: disk full or I/O error; the previous one is intact)."""
    from kiln.distributed.parallel_dims import RankFailure
    from kiln.train.checkpoint import StorageError
    from kiln.train.run import run_training

    job, resume, given, _ = parse_job(argv)
    try:
        run_training(job, resume=resume, given=given)
    except RankFailure as exc:  # not a user error (exit 1), but no traceback either
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:  # the machine's disk, not the user
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


ESTIMATE_MEMORY = (
    "Estimate each rank's training memory: for the --parallel.* layout given, else DDP and FSDP2."
)


def cmd_estimate_memory(argv: list[str]) -> int:
    """``kiln estimate-memory [train flags] [--world-size N | --nproc N]``: print the per-rank
    table (the layout the ``parallel.*`` flags give, else DDP and FSDP2 with and without AC)."""
    world = Option(
        "--world-size", aliases=("--nproc",), kind=int, metavar="N",
        default=int(os.environ.get("WORLD_SIZE", "1")), accepted=POSITIVE,
        help="ranks (processes) to estimate for; the default is $WORLD_SIZE where it is set",
    )  # fmt: skip
    job, _, given, opts = parse_job(
        argv, "kiln estimate-memory", ESTIMATE_MEMORY, (world,), resume=False
    )
    from kiln.train.memory_report import estimate_for_job, format_table

    layout = any(g.startswith("parallel.") and g != "parallel.timeout_s" for g in given)
    text, estimates = estimate_for_job(job, opts["world_size"], layout=layout)
    print(text)
    print(format_table(estimates))
    return 0


PERF = "Predict the time, bytes and MFU of each operator of a training step on a device."


def _perf_options() -> tuple[Option, ...]:
    from kiln.planning.hardware import DEVICES

    devices = ", ".join(["cpu (measured here)", *DEVICES])
    return (
        Option("--preset", "a named model shape; shorthand for --model.preset, and wins over it",
               metavar="NAME", sets="model.preset"),
        Option("--device", f"the device to predict for: {devices} (any case)", default="cpu",
               metavar="D"),
        Option("--json", "print the report as one JSON object instead of tables", kind=bool),
        Option("--figure", "also draw the per-operator times into this PNG file",
               metavar="PNG"),
    )  # fmt: skip


def cmd_perf(argv: list[str]) -> int:
    """``kiln perf [train flags] [--preset NAME] [--device D] [--json] [--figure PNG]``."""
    job, _, given, opts = parse_job(argv, "kiln perf", PERF, _perf_options(), resume=False)
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
