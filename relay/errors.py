"""The errors that end a command, each told to the user as one line.

Raised anywhere, turned into an exit status only by relay/cli.py: a ConfigError is exit 2 (bad
config or usage, one line per problem), a FatalError exit 1 (a runtime failure). This module
imports nothing of the relay's, so every layer can raise them without importing the one above.
"""

from __future__ import annotations


class ConfigError(Exception):
    """One or more problems in a config file, each a line `FILE: dotted.key: what is wrong`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class FatalError(Exception):
    """A runtime failure reported as one line and exit status 1.

    `logged`: the line already went to the log (with its level and fields, as `relay run` logs
    everything), so only the exit status is left to set."""

    def __init__(self, message: str, *, logged: bool = False) -> None:
        super().__init__(message)
        self.logged = logged
