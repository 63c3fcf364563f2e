"""Small option checks shared by the built-in strategies."""

from __future__ import annotations

from cola import ConfigError


def positive_int(what: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what}={value!r}: must be an integer >= {minimum}")
    return value


def fraction(what: str, value, low_open: bool = False, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ConfigError(f"{what}={value!r}: must be a number in {interval}")
    return float(value)
