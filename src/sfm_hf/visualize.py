"""Pictures: matplotlib without a display, and the preview grid of synthetic images with class names."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .utils import atomic_path

MAX_PREVIEW_CLASSES = 100


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend): runs need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int) -> Path:
    """Write ``figure`` to ``path`` atomically (its suffix picks the format) and release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi)
    pyplot().close(figure)
    return path


def save_preview(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path,
                 max_classes: int = MAX_PREVIEW_CLASSES) -> Path:
    """A PNG grid: one row block per class (up to ``max_classes``), its name under every image."""
    plt = pyplot()
    keep = labels < max_classes
    images, labels = images[keep].detach().float().clamp(0, 1).cpu(), labels[keep].cpu()
    count = len(images)
    columns = min(10, count) if count else 1
    rows = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, label in zip(axes.flat, images, labels.tolist()):
        axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(class_names[label][:18], fontsize=7, y=-0.22)
    figure.tight_layout()
    return save_figure(figure, path, dpi=100)
