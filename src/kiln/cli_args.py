"""Argument parsing shared by the ``kiln`` verbs: numeric ranges checked before a verb runs,
jsonargparse parsers that fail with one sentence, and ``parse_job`` (``kiln train``'s flags and
``--config`` files → a ``JobConfig``, plus the own ``Option``s of a verb that takes them too)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
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
    missing_or_extra = r"argument ([^:]+): (?:expected one argument|ignored explicit argument (.*))"
    m = re.match(missing_or_extra, text)
    if m:  # argparse names every alias (--world-size/--nproc); name the one typed if known
        names = m.group(1).split("/")
        flag = next((f for f in (flags or {}).values() if f in names), names[0])
        if m.group(2) is None:
            return ConfigError(f"{flag} needs a value.")
        return ConfigError(f"{flag} is a switch and takes no value, got {m.group(2)}.")
    first = " ".join(text.split())[:200]
    return ConfigError(f"{first[0].upper()}{first[1:]}." if first else "Invalid arguments.")


RESUME_HELP = (
    "continue the run in --run.dir: bare, from its newest complete checkpoint; 'auto', the "
    "same command whether or not the run exists yet (a new run in a directory without one, "
    "else this run resumed; a different run there is refused); or a checkpoint, "
    "step-NNNNNNN or its path, to continue from an older one"
)


@dataclasses.dataclass(frozen=True)
class Option:
    """One of a verb's own flags, parsed by ``parse_job`` next to ``kiln train``'s flags and
    listed under the verb's name in its --help."""

    flag: str
    help: str
    aliases: tuple[str, ...] = ()
    kind: type = str  # bool: a bare switch (``--json``), False unless given
    default: object = None
    metavar: str | None = None
    accepted: Range | None = None  # a number: checked when given, naming the flag as typed
    sets: str | None = None  # shorthand for a train flag (``model.preset``): given, it wins


class ParsedJob(typing.NamedTuple):
    """What ``parse_job`` returns."""

    job: JobConfig
    resume: str | None  # --resume's value, None when not given
    given: set[str]  # ``section.field`` names set explicitly by flags or --config files
    options: dict[str, object]  # the verb's own options by name (``world_size``), else empty


def _typed(argv: list[str], option: Option) -> str | None:
    """The name argv last gave ``option`` by (``--world-size`` or ``--nproc``), None if unset."""
    names = (option.flag, *option.aliases)
    used = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in names]
    return used[-1] if used else None


def parse_job(
    argv: list[str],
    prog: str = "kiln train",
    description: str | None = None,
    options: tuple[Option, ...] = (),
    resume: bool = True,
) -> ParsedJob:
    """``kiln train``'s arguments (flags and ``--config`` files) → a ``JobConfig``; the verbs
    that also take a training config pass their ``prog``, one-line ``description`` and own
    ``options`` (shown in --help, parsed here), and ``resume=False`` to refuse --resume."""
    from jsonargparse import ActionConfigFile

    verb = prog.removeprefix("kiln ")
    if not resume and any(a.split("=", 1)[0] == "--resume" for a in argv):
        raise ConfigError(f"{verb} takes a config, not --resume.")
    own = {o.flag[2:].replace("-", "_"): o for o in options}
    names = {n[2:] for o in options for n in (o.flag, *o.aliases)}
    _check_flag_names(argv, {"config"} | ({"resume"} if resume else set()) | names)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            given |= _check_yaml(argv[i + 1])
        elif arg.startswith("--config="):
            given |= _check_yaml(arg.split("=", 1)[1])
    parser = _parser(prog)
    parser.description = description
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of sections")
    if resume:
        parser.add_argument(
            "--resume", nargs="?", const="latest", default=None, metavar="auto|CHECKPOINT",
            help=RESUME_HELP,
        )  # fmt: skip
    group = parser.add_argument_group(f"{verb} options") if options else None
    for o in options:
        help = f"{o.help}; {o.accepted.describe()}" if o.accepted else o.help
        if o.kind is bool:
            group.add_argument(o.flag, *o.aliases, action="store_true", help=help)
        else:
            group.add_argument(
                o.flag, *o.aliases, type=o.kind, default=o.default, metavar=o.metavar, help=help
            )
    parser.add_class_arguments(JobConfig, nested_key=None, fail_untyped=True)
    typed = {dest: _typed(argv, o) for dest, o in own.items()}
    try:
        ns = parser.parse_args(argv)
        for dest, o in own.items():
            if o.accepted and typed[dest]:  # defaults are ours; only a typed value is checked
                o.accepted.check(typed[dest], ns[dest])
            if o.sets and ns[dest] is not None:
                ns[o.sets] = ns[dest]
                given.add(o.sets)
        init = parser.instantiate(ns)
    except KilnError:
        raise
    except Exception as exc:  # jsonargparse.ArgumentError and friends
        flags = {dest: typed[dest] or o.flag for dest, o in own.items()}
        raise _argument_error(exc, flags) from exc
    sections = {f.name: init[f.name] for f in dataclasses.fields(JobConfig)}
    return ParsedJob(
        JobConfig(**sections),
        ns.resume if resume else None,
        {n for n in given if "." in n},
        {dest: ns[dest] for dest in own},
    )


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
