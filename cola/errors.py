"""The library's own exception types: every error a user can cause is one of these."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ColaError(Exception):
    """Base class of every error raised on purpose by chain-of-lora."""


class ConfigError(ColaError, ValueError):
    """One or more invalid settings; ``problems`` lists each one."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class PluginError(ColaError):
    """A plugin misbehaved: a duplicate name, a wrong factory, an exception inside a hook."""


class UnknownStrategyError(ConfigError):
    """A strategy name that no registered plugin provides."""


class NonFiniteMergeError(ColaError):
    """A knot was refused because the update to fold is not finite; nothing was written."""


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """Known names ordered by similarity to ``name`` (closest first), at most ``n``."""
    known = list(known)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.4)
    return matches or sorted(known)[:n]
