"""Typed configuration: dataclasses filled from a YAML recipe plus command-line overrides.

Every key a recipe may contain is a field of a section below with a ``help`` text; ``--help`` on
the command line prints them all. Overrides use dotted paths: ``--ipc 2``,
``--distill.iterations 50``, ``--stages statistics,distill``.

Each section checks its own values (its ``validate``) and ``Config.validate`` what spans sections. A
config is filled after construction (recipe, then command line), so the checks run once it is
complete (``parse_config``), not in ``__post_init__``.

Modules: ``options`` (data, Stage I and II sections, the shared checks), ``evaluation_options``,
``hub_options``, ``run`` (``Config``, the top-level keys) and ``parsing`` (recipes, command lines, help);
this one names what the rest of the library imports.
"""

from __future__ import annotations

from .evaluation_options import EvaluateOptions
from .hub_options import HubOptions
from .options import ConfigError, DataOptions, DistillOptions, GoldenOptions, StatisticsOptions
from .parsing import (
    config_from_dict, help_text, iter_options, iter_sections, load_recipe, option_default, option_type, parse_config,
    parse_overrides,
)
from .run import STAGES, Config

__all__ = [
    "STAGES", "Config", "ConfigError", "DataOptions", "DistillOptions", "EvaluateOptions", "GoldenOptions",
    "HubOptions", "StatisticsOptions", "config_from_dict", "help_text", "iter_options", "iter_sections", "load_recipe",
    "option_default", "option_type", "parse_config", "parse_overrides",
]
