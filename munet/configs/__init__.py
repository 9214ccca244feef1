"""Presets: one module per experiment, each with ``get_config() -> RunConfig`` and a docstring saying what it
reproduces, what to expect and the exact command (big_vision style)."""

from __future__ import annotations

import importlib

from munet.config import RunConfig
from munet.errors import ConfigError

PRESETS = ("default", "smoke", "chars", "vdd")


def get_preset(name: str) -> RunConfig:
    """The preset's configuration; unknown names raise ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return importlib.import_module(f"munet.configs.{name}").get_config()


def describe(name: str) -> str:
    """First line of the preset's docstring."""
    doc = importlib.import_module(f"munet.configs.{name}").__doc__ or ""
    return doc.strip().splitlines()[0]
