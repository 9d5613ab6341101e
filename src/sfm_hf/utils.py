"""Small shared helpers with no better home."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file


def quiet_libraries() -> None:
    """Keep the console for our progress bars and summaries: library chatter only at warning level."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def save_tensors_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary name, so a crash never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)


def write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
