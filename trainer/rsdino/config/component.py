"""What every component-owned config shares: its checks collected, then raised as one error.

A component's dataclass (e.g. ``data/augment_config.py``) holds its keys' defaults, documents
each field and checks its own values in ``__post_init__``; it raises :class:`ConfigProblems`
naming every bad key by its full path, so ``rsdino train`` can list all of them at once.
Modules here stay free of torch: the CLI parser and config loader import them.
"""

from __future__ import annotations

from collections.abc import Sequence

_UNSHOWN = object()  # a problem whose message is clearer without the value


class ConfigProblems(ValueError):
    """One component's bad values, each a message naming its key's full path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class Checks:
    """Collects a component's problems; ``raise_any`` raises them together."""

    def __init__(self, section: str) -> None:
        self.section = section
        self.problems: list[str] = []

    def require(self, ok: bool, key: str, rule: str, value: object = _UNSHOWN) -> None:
        """Unless ``ok``: "<section>.<key>=<value> <rule>" (without "=<value>" if not given)."""
        if not ok:
            shown = "" if value is _UNSHOWN else f"={_show(value)}"
            self.problems.append(f"{self.section}.{key}{shown} {rule}")

    def choice(self, key: str, value: str, choices: Sequence[str]) -> None:
        if value not in choices:
            self.problems.append(
                f"{self.section}.{key}={value!r} is not one of {', '.join(choices)}"
            )

    def probability(self, key: str, value: float) -> None:
        self.require(0.0 <= value <= 1.0, key, "must be a probability in [0, 1]", value)

    def interval(
        self, key: str, values: Sequence[float], low: float, high: float, low_ok: bool = False
    ) -> None:
        """``values`` is [min, max] with ``low < min <= max <= high`` (``low <= min`` with
        ``low_ok``)."""
        above = values[0] >= low if low_ok else values[0] > low
        ok = len(values) == 2 and above and values[0] <= values[1] <= high
        bound = "<=" if low_ok else "<"
        self.require(ok, key, f"must be [min, max] with {low} {bound} min <= max <= {high}", values)

    def raise_any(self) -> None:
        if self.problems:
            raise ConfigProblems(self.problems)


def _show(value: object) -> object:
    return list(value) if isinstance(value, tuple | list) else value
