"""What Stage II writes: ``synthetic/`` (images, record, preview), the summary line, the trackers' numbers."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.logging import get_logger

from ..config import Config
from ..errors import StageInputError
from ..objectives import sfm_loss
from ..pyramid import build_images
from ..layout import FEATURES_DIR, IMAGES_FILE, PREVIEW_FILE, SYNTHETIC_JSON, RunLayout
from ..names import short_name
from ..statistics import Statistics, load_feature_cache
from ..tracking import log_images
from ..utils import library_versions, save_tensors_atomically, write_text_atomically
from ..visualize import save_preview
from .loop import DistillRun

logger = get_logger(__name__)


@torch.no_grad()
def flow_agreement(backbone, images: torch.Tensor, labels: torch.Tensor, statistics: Statistics) -> float:
    """cos(F*, flow of ``images``) without augmentation: how well a set of images carries the statistical flow."""
    features = torch.cat([backbone(chunk) for chunk in images.split(256)]).cpu()
    return 1.0 - float(
        sfm_loss(features, labels.cpu(), statistics.class_means, statistics.flow())
    )


def _random_real_agreement(config: Config, statistics: Statistics) -> float | None:
    """The same cosine for ``ipc`` random real train images per class, from the Stage I feature cache."""
    cache = RunLayout(config.output_dir).statistics_dir / FEATURES_DIR
    try:
        features, labels, _ = load_feature_cache(cache, "train")
    except StageInputError:
        return None
    generator = torch.Generator().manual_seed(config.seed)
    chosen = []
    for c in range(statistics.num_classes):
        rows = torch.nonzero(labels == c).flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[: config.ipc]])
    chosen = torch.cat(chosen)
    loss = sfm_loss(features[chosen].float(), labels[chosen], statistics.class_means, statistics.flow())
    return 1.0 - float(loss)



def write_outputs(run: DistillRun, accelerator, final: torch.Tensor, seconds: float, folder: Path) -> None:
    """synthetic/ with the flow agreement of the final and initial images per backbone; the summary line, the
    trackers and the saturation warning. Main process only."""
    config, options, device = run.config, run.config.distill, accelerator.device
    statistics, targets = run.targets[0].statistics, run.targets
    num_classes = statistics.num_classes
    last_loss = float(run.last_loss)
    labels = _all_labels(num_classes, config.ipc)
    with torch.no_grad():
        initial = build_images(
            options.representation, num_classes * config.ipc, options.syn_res, seed=config.seed,
            decorrelate=options.decorrelate, start=run.start,
        )().to(device)
    agreements = {}
    for target in targets:
        unwrapped = target.backbone._orig_mod if hasattr(target.backbone, "_orig_mod") else target.backbone
        agreements[target.config.backbone] = {
            "final_images": flow_agreement(unwrapped, final.to(device), labels, target.statistics),
            "initial_images": flow_agreement(unwrapped, initial, labels, target.statistics),
            "random_real_images": _random_real_agreement(target.config, target.statistics),
        }
    saturated = saturated_fraction(final)
    write_synthetic(folder, final, labels, statistics, config, seconds, last_loss, agreements,
                    inputs=run.inputs, saturated=saturated, peak_memory=peak_memory_mib(device))
    flows = "; ".join(
        ("" if len(targets) == 1 else f"{short_name(name)} ") + f"final {values['final_images']:.3f}, initial "
        f"{values['initial_images']:.3f}, random real "
        + ("n/a" if values["random_real_images"] is None else f"{values['random_real_images']:.3f}")
        for name, values in agreements.items()
    )
    logger.info(
        f"Stage II: {len(final)} images ({config.ipc}/class, {options.syn_res}px, from {options.init}) by "
        f"{options.method} in "
        f"{seconds:.1f} s over {options.iterations - run.start_step} steps; final loss {last_loss:.4f}. "
        f"cos(F*, flow): {flows}. -> {folder}"
    )
    logged = {"distill/final_loss": last_loss, "distill/seconds": seconds}
    for backbone_name, values in agreements.items():
        prefix = "distill/flow_cosine" + ("" if len(targets) == 1 else f"/{short_name(backbone_name)}")
        logged.update({f"{prefix}/{name}": value for name, value in values.items() if value is not None})
    accelerator.log(logged, step=options.iterations)
    log_images(accelerator, {"distill/preview": folder / PREVIEW_FILE}, step=options.iterations)
    if saturated > SATURATION_WARNING:
        logger.warning(
            "%.0f%% of the synthetic pixel values sit at 0 or 1 (saturated): the images carry little beyond "
            "their sign pattern, whatever the flow cosine says. distill.lr %g is probably too high for "
            "distill.representation %r.", 100 * saturated, options.lr, options.representation,
        )


# A pixel "sits at 0 or 1" when it rounds to 0 or 255 in 8 bits.
SATURATION_TOLERANCE = 0.5 / 255
SATURATION_WARNING = 0.5


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak CUDA memory allocated on ``device`` since :func:`reset_peak_memory` (backbone, images, optimiser and
    the largest step's activations); None off CUDA, where torch's allocator keeps no such figure."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def saturated_fraction(images: torch.Tensor) -> float:
    """Share of the pixel values of ``images`` (in [0, 1]) that round to 0 or 255 in 8 bits."""
    saturated = (images <= SATURATION_TOLERANCE) | (images >= 1 - SATURATION_TOLERANCE)
    return float(saturated.float().mean())


def _all_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def write_synthetic(folder: Path, images, labels, statistics: Statistics, config: Config, seconds: float,
                    final_loss: float, agreements: dict[str, dict], *, inputs: dict, saturated: float,
                    peak_memory: float | None) -> None:
    """``agreements``: the flow cosines per distillation backbone; a joint set records them by backbone
    (``flow_cosine_by_backbone``), a single-backbone set as ``flow_cosine``. ``peak_memory``: the main process's
    peak CUDA MiB during the stage (:func:`peak_memory_mib`), None on CPU."""
    folder.mkdir(parents=True, exist_ok=True)
    # The record goes first and comes back last: a crash in between leaves images without a record
    # (re-made by the next run), never a record describing other images.
    (folder / SYNTHETIC_JSON).unlink(missing_ok=True)
    save_tensors_atomically({"images": images.float().contiguous(), "labels": labels.contiguous()}, folder / IMAGES_FILE)
    metadata = {
        "class_names": statistics.class_names,
        "ipc": config.ipc,
        "method": config.distill.method,
        "iterations": config.distill.iterations,
        "seed": config.seed,
        "backbone": config.backbone,
        "dataset": config.dataset,
        "resolution": config.distill.syn_res,
        "distill": asdict(config.distill),
        "augment": asdict(config.augment),
        "seconds": round(seconds, 3),
        "peak_memory_mib": peak_memory,
        "final_loss": None if not math.isfinite(final_loss) else final_loss,
        **({"flow_cosine_by_backbone": agreements} if config.is_joint
           else {"flow_cosine": agreements[config.backbone]}),
        "saturated_fraction": round(saturated, 4),
        "versions": library_versions(),
        # What these images were made from: a later run compares it to decide whether they are current.
        "inputs": inputs,
        # The whole config that made them (settings resolved): what export publishes as the recipe of the set.
        "config": config.to_dict(),
    }
    write_text_atomically(folder / SYNTHETIC_JSON, json.dumps(metadata, indent=2))
    save_preview(images, labels, statistics.class_names, folder / PREVIEW_FILE)
