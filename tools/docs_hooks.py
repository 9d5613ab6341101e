"""MkDocs hooks (mkdocs.yml `hooks:`): the option reference is written from the typed config at build time.

A page holding the line ``<!-- options -->`` gets, in its place, one table per config section with every option's
key, type, default and help (the key unbroken: docs/assets/extra.css): the same fields and text `sfm-hf --help` prints (`sfm_hf.config.help_text`), so the
page cannot drift from the code. The build fails on an option or section without help.
"""

from __future__ import annotations

import html
import sys
import types
import typing
from pathlib import Path

MARKER = "<!-- options -->"
SOURCE = Path(__file__).resolve().parents[1] / "src"


def _config():
    """This checkout's config package, whatever sfm_hf the interpreter would otherwise import."""
    if str(SOURCE) not in sys.path:
        sys.path.insert(0, str(SOURCE))
    from sfm_hf import config

    return config


def type_name(hint: typing.Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _help(key: str, field) -> str:
    text = field.metadata.get("help", "")
    if not text:
        raise ValueError(f"option `{key}` has no help text: give it one with option(default, 'help') in src/sfm_hf/config/")
    return text


def options_markdown() -> str:
    """Every option of ``sfm_hf.config.Config``, grouped by section, as Markdown with one HTML table per section."""
    config = _config()
    sections = {"": "Top-level keys of a recipe."}
    sections.update((key, _help(key, field)) for key, field in config.iter_sections())
    rows: dict[str, list[str]] = {name: [] for name in sections}
    for key, field in config.iter_options():
        section = key.rpartition(".")[0]
        hint = config.option_type(key)
        rows[section].append(
            f'<tr id="{key}"><td><code class="option-key">{key}</code><br>'
            f"<small>{html.escape(type_name(hint))}, default <code>{html.escape(repr(config.option_default(field)))}"
            f"</code></small></td><td>{html.escape(_help(key, field))}</td></tr>"
        )
    parts = []
    for section, description in sections.items():
        if not rows[section]:
            continue
        parts.append(f"## `{section}`" if section else "## Top level")
        parts.append(html.escape(description))
        parts.append("<table><thead><tr><th>option</th><th>meaning</th></tr></thead><tbody>\n"
                     + "\n".join(rows[section]) + "\n</tbody></table>")
    return "\n\n".join(parts) + "\n"


def usage_text() -> str:
    """The usage lines `sfm-hf --help` prints above the options (the docstring of ``sfm_hf.cli``)."""
    _config()
    from sfm_hf import cli

    return cli.__doc__.strip()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    generated = f"```text\n{usage_text()}\n```\n\n{options_markdown()}"
    return markdown.replace(MARKER, generated)
