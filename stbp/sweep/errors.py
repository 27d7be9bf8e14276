"""The sweep's error: an invalid sweep file or option, named by its dotted key."""

from __future__ import annotations

from ..config import ConfigError

__all__ = ["SweepError"]


class SweepError(ConfigError):
    """An invalid sweep file or sweep option; raised before anything starts."""

    key_noun = "sweep key"
