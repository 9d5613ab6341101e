"""Recipes and command lines into a ``Config``: YAML, dotted ``--key value`` overrides read by type, ``--help``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .options import ConfigError
from .run import Config


class CommandLineText(str):
    """A value typed on the command line: read by the field's declared type, never as YAML."""


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NULL_WORDS = ("null", "none", "~")


def _from_text(text: str, hint: Any, key: str) -> Any:
    """Command-line text -> a value of ``hint``; strings stay exactly as typed."""
    text = str(text)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and text.strip().lower() in NULL_WORDS:
            return None
        # The declared order decides (`int | str` reads 256 as a number, auto as text), except that
        # bracketed text is a list where the field allows one (`str | list[str]`: '[a, b]').
        bracketed = text.strip().startswith("[") and text.strip().endswith("]")
        options = sorted(options, key=lambda option: not (bracketed and typing.get_origin(option) is list))
        errors = []
        for option_hint in options:
            if option_hint is type(None):
                continue
            try:
                return _from_text(text, option_hint, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        inner = text.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        return [_from_text(part.strip(), item_hint, key) for part in inner.split(",") if part.strip()]
    if hint is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(f"`{key}` expects true or false, got {text!r}.")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"`{key}` expects an integer, got {text!r}.") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"`{key}` expects a finite number, got {text!r}.") from None
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` (YAML-parsed, or a command-line string) against a field's type, converting safe cases.

    Command-line text goes through :func:`_from_text` first, so its strings stay verbatim
    (``--dataset_config 1.10`` is '1.10', never the number 1.1).
    """
    if isinstance(value, CommandLineText):
        value = _from_text(value, hint, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_hint in options:
            if option_hint is type(None):
                continue
            try:
                return _coerce(value, option_hint, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` expects a list, got {value!r}.")
        return [_coerce(item, item_hint, key) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` expects true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` expects an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number to anyone writing a recipe.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"`{key}` expects a finite number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"`{key}` expects a string, got {value!r}.")
    raise ConfigError(f"`{key}` has an unsupported type {hint!r}.")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint)


def _apply(target: Any, key_path: str, value: Any) -> None:
    *parents, leaf = key_path.split(".")
    node = target
    walked = []
    for part in parents:
        hints = typing.get_type_hints(type(node))
        if part not in hints or not _is_section(hints[part]):
            raise ConfigError(f"Unknown section `{'.'.join(walked + [part])}`. Known keys: {_known_keys(type(target))}")
        node = getattr(node, part)
        walked.append(part)
    hints = typing.get_type_hints(type(node))
    if leaf not in hints:
        raise ConfigError(f"Unknown key `{key_path}`. Known keys: {_known_keys(type(target))}")
    if _is_section(hints[leaf]):
        if not isinstance(value, dict):
            raise ConfigError(f"`{key_path}` is a section; give it a mapping of keys.")
        for sub_key, sub_value in value.items():
            _apply(target, f"{key_path}.{sub_key}", sub_value)
        return
    setattr(node, leaf, _coerce(value, hints[leaf], key_path))


def _known_keys(cls: type, prefix: str = "") -> str:
    return ", ".join(name for name, _ in iter_options(cls, prefix))


def iter_options(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every leaf option as (dotted key, field), sections flattened."""
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        if _is_section(hints[name]):
            yield from iter_options(hints[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def iter_sections(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every section (a field holding options) as (dotted key, field), outer before inner."""
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        if _is_section(hints[name]):
            yield f"{prefix}{name}", f
            yield from iter_sections(hints[name], f"{prefix}{name}.")


def option_default(f: dataclasses.Field) -> Any:
    """An option's default as a fresh config holds it (a factory's list, not the factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def config_from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    config = base if base is not None else Config()
    for key, value in values.items():
        _apply(config, key, value)
    return config


def load_recipe(path: str | Path, base: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe {str(path)!r} does not exist.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"Recipe {str(path)!r} is not UTF-8 text (byte {error.start}): save it as UTF-8.") from None
    except OSError as error:
        raise ConfigError(f"Recipe {str(path)!r} cannot be read ({error.strerror or error}).") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"Recipe {str(path)!r} is not valid YAML: {_yaml_problem(error)}.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Recipe {str(path)!r} must be a YAML mapping of keys, got {type(values).__name__}.")
    return config_from_dict(values, base)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """'line 2, column 9: flow sequence ... expected ...' from PyYAML's multi-line message."""
    mark = getattr(error, "problem_mark", None)
    problem = ", ".join(part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
    problem = problem or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def help_text() -> str:
    lines = ["Options (YAML keys of a recipe, or --key value on the command line):"]
    for key, f in iter_options():
        lines.append(f"  --{key} (default: {option_default(f)!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def option_type(key_path: str, cls: type = None) -> Any:
    """The declared type of a dotted option, or None when no such leaf option exists."""
    node = Config if cls is None else cls
    *parents, leaf = key_path.split(".")
    for part in parents:
        hint = typing.get_type_hints(node).get(part)
        if hint is None or not _is_section(hint):
            return None
        node = hint
    return typing.get_type_hints(node).get(leaf)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config PATH`` from ``--key value`` / ``--key=value`` overrides.

    Values stay text (:class:`CommandLineText`), read later by each field's declared type. A
    boolean option given alone (``--hub.push``, followed by another option or nothing) means true,
    as in the Hugging Face example scripts.
    """
    recipe = None
    overrides: dict[str, Any] = {}
    position = 0
    while position < len(argv):
        token = argv[position]
        if not token.startswith("--"):
            raise ConfigError(f"Unexpected argument {token!r}: options look like --key value.")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            position += 1
        elif position + 1 >= len(argv) or argv[position + 1].startswith("--"):
            key = token[2:]
            if key == "config" or option_type(key) not in (bool, None):
                raise ConfigError(f"Option {token} needs a value.")
            # An unknown key gets its "Unknown key" message (with the known ones) when applied.
            raw = "true"
            position += 1
        else:
            key, raw = token[2:], argv[position + 1]
            position += 2
        if key == "config":
            recipe = raw
        else:
            overrides[key] = CommandLineText(raw)
    return recipe, overrides


def parse_config(argv: list[str], default: Config | None = None) -> Config:
    """Recipe (``--config``) or ``default``, then command-line overrides, then validation."""
    recipe, overrides = parse_overrides(argv)
    if recipe is not None:
        config = load_recipe(recipe)
    elif default is not None:
        config = default
    else:
        raise ConfigError("No recipe given: pass --config recipes/<name>.yaml.")
    config = config_from_dict(overrides, config)
    config.validate()
    return config
