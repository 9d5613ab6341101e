"""Pictures of synthetic images: the preview grid with class names under each image."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .utils import atomic_path

MAX_PREVIEW_CLASSES = 100


def save_preview(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], path: Path,
                 max_classes: int = MAX_PREVIEW_CLASSES) -> Path:
    """A PNG grid: one row block per class (up to ``max_classes``), its name under every image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)
    plt.close(figure)
    return path
