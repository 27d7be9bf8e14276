"""The error every floor may raise for a bad setting: the config validates fields, the data layer refuses frame
settings that a data set cannot use, training refuses a batch that does not split over its ranks. Lowest floor:
imports nothing of the package."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """An invalid, ill-typed or unknown configuration value."""
