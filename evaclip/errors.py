"""Exceptions shared across evaclip (importable without torch)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override names an unknown key, has a wrong type, or an invalid value. The message is one line that
    names the full key and says what to do."""
