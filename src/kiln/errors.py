"""User-facing errors.

Anything a user can fix (a bad flag, a missing file, a checkpoint of another shape) is raised as
a :class:`KilnError` with one sentence naming the offending value and what would be accepted.
``kiln.cli`` prints that sentence and exits with code 2; everything else is a bug (exit 1).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KilnError(Exception):
    """A problem the user can fix; its message is one sentence shown without a traceback."""


class ConfigError(KilnError):
    """An invalid configuration value or key."""


class DataError(KilnError):
    """A corpus, tokenizer or token shard that cannot be used."""


class CheckpointError(KilnError):
    """A checkpoint or run directory that cannot be used."""


def closest(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest valid choice, or '' if nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(section: str, name: str, value: str, choices: Iterable[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"{section}.{name} is {value!r} but must be one of {', '.join(map(str, choices))}"
            f"{closest(str(value), choices)}."
        )


def check_positive(section: str, name: str, value: float | int | None, allow_zero=False) -> None:
    """Raise ConfigError unless ``value`` is None or > 0 (>= 0 with ``allow_zero``)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name} is {value} but must be {bound}.")
