"""The search space's parameters: a float or int range, or a choice, each with its Optuna distribution."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import Field

from ..validation import Word, section
from .errors import SweepError

__all__ = ["Range", "IntRange", "Choice", "Param", "PARAMS"]

sweep_section = functools.partial(section, error=SweepError)
Number = Annotated[float, Word("a number")]


class _Interval:
    """``low < high``; the shared half of :class:`Range` and :class:`IntRange`."""

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got low={self.low}")

    def contains(self, value: Any) -> bool:
        number = (int,) if self.type == "int" else (int, float)
        return isinstance(value, number) and not isinstance(value, bool) and self.low <= value <= self.high

    def describe(self) -> str:
        return f"{self.type}[{self.low}, {self.high}]"


@sweep_section
class Range(_Interval):
    """A float drawn from [low, high], uniformly or log-uniformly."""

    type: Literal["uniform", "loguniform"]
    low: Number
    high: Number

    def distribution(self):
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.type == "loguniform")


@sweep_section
class IntRange(_Interval):
    """An int drawn from [low, high]."""

    type: Literal["int"]
    low: int
    high: int

    def distribution(self):
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high)


@sweep_section
class Choice:
    """One of ``values``."""

    type: Literal["choice"]
    values: Annotated[tuple[bool | int | float | str | None, ...], Field(min_length=1, strict=False)]

    def contains(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return f"choice{list(self.values)}"

    def distribution(self):
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(list(self.values))


Param = Range | IntRange | Choice
PARAMS = {"uniform": Range, "loguniform": Range, "int": IntRange, "choice": Choice}
