"""Card rendering: the Jinja2 templates of ``model_cards/`` filled into huggingface_hub cards, and their filters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .facts import PathRedactor

PAPER = "Statistical Flow Matching (SFM) with classifier inheritance (CI)"


def templates_dir() -> Path:
    """``model_cards/``: the package ``sfm_hf.model_cards`` of a wheel (setup.cfg maps it), or a checkout's own."""
    package = Path(__file__).resolve().parents[1]
    installed, checkout = package / "model_cards", package.parents[1] / "model_cards"
    return installed if installed.is_dir() else checkout


def render(template: str, **values: Any) -> str:
    """Fill a card template of ``model_cards/`` (Jinja2; undefined names are errors)."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    environment.filters["percent"] = _percent
    environment.filters["size"] = human_size
    environment.filters["versions"] = _versions_line
    return environment.get_template(template).render(**values)


def make_card(card_class, template: str, card_data, redact: PathRedactor, **values: Any):
    """A huggingface_hub card (ModelCard / DatasetCard) from one of our templates; the metadata is ``card_data``."""
    return card_class(redact(render(template, card_data=card_data.to_yaml(), **values)))


def _versions_line(versions: dict[str, str | None]) -> str:
    return ", ".join(f"{package} {version}" for package, version in versions.items() if version)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def size_category(count: int) -> str:
    """The Hub's size_categories bucket of a dataset with ``count`` examples."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "1M<n<10M"

