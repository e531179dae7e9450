"""``kiln <verb>``: parse arguments, call one function per verb, map errors to exit codes.

Exit codes: 0 success, 2 a user error (one sentence on stderr, no traceback), 3 a checkpoint
that could not be written (disk full, I/O error; one sentence), 1 anything else.
Only this module and the ``kiln.cli_*`` modules it dispatches to know about argv and exit
codes: ``cli_args`` (parsing helpers, ``parse_job``), ``cli_train`` (train, estimate-memory,
perf), ``cli_tools`` (generate, convert, eval, data, sparsity), ``cli_plan`` (plan, scale, mup).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from kiln.cli_args import (  # noqa: F401  (re-exported: ``from kiln.cli import parse_job``)
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    RESUME_HELP,
    SEED,
    Range,
    _argument_error,
    _check_flag_names,
    _check_yaml,
    _job_keys,
    _join_negative_values,
    _number,
    _numbers,
    _parse,
    _parser,
    parse_job,
)
from kiln.cli_plan import (  # noqa: F401  (re-exported)
    _moe_plan_shape,
    _plan_layout,
    _scale_predict,
    cmd_mup,
    cmd_plan,
    cmd_scale,
)
from kiln.cli_tools import (  # noqa: F401  (re-exported)
    _data_prepare,
    cmd_convert,
    cmd_data,
    cmd_eval,
    cmd_generate,
    cmd_sparsity,
)
from kiln.cli_train import cmd_estimate_memory, cmd_perf, cmd_train
from kiln.errors import KilnError, closest

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
