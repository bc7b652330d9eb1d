"""Problems found in a recipe, gathered so the user sees all of them at once."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    source: str  # the file (recipe or spec) or "command line" that set the value
    key: str  # dotted recipe key; "" for a problem with the whole file
    message: str
    value: object = None
    has_value: bool = False

    def __str__(self) -> str:
        key = self.key.replace("\n", "\\n")
        where = f"{self.source}: {key}" if key else self.source
        got = f" (got {self.value!r})" if self.has_value else ""
        if len(got) > 200:
            got = got[:196] + "...)"
        return " ".join(f"{where}: {self.message}{got}".splitlines())  # one line, whatever the message holds


def first_line(error: BaseException) -> str:
    """An exception's message, cut to its first line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def problem(source: str, key: str, message: str, *value) -> Problem:
    """A Problem; pass the offending value as a fourth argument to show it."""
    return Problem(source, key, message, value[0] if value else None, bool(value))


class ConfigError(Exception):
    """One or more problems with a recipe, a spec or the files they name."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RankFailed(Exception):
    """A rank of a tensor-parallel run failed: its one-line error, and the exit status to end with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code
