"""Argument parsing shared by the ``kiln`` verbs: numeric ranges checked before a verb runs,
jsonargparse parsers that fail with one sentence, and ``parse_job`` (``kiln train``'s flags and
``--config`` files → a ``JobConfig``)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from kiln.config import JobConfig
from kiln.errors import ConfigError, KilnError, closest


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
