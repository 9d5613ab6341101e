"""What the experiment trackers (``trackers`` / ``--report_to``) receive besides the scalars each stage logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tracker_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The full config, flattened to the scalar types every tracker accepts (lists joined, null spelt out)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(tracker_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = ",".join(str(item) for item in value)
        elif value is None:
            flat[f"{prefix}{key}"] = "null"
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_images(accelerator, images: dict[str, Path], step: int | None = None) -> None:
    """Send image files to every tracker that takes images (main process only, as ``accelerator.log``)."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    arrays = {key: np.asarray(Image.open(path).convert("RGB")) for key, path in images.items() if Path(path).is_file()}
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images") or not arrays:
            continue
        if tracker.name == "tensorboard":  # SummaryWriter.add_images: one [N, H, W, C] batch per key
            tracker.log_images({key: array[None] for key, array in arrays.items()}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({key: [array] for key, array in arrays.items()}, step=step)
