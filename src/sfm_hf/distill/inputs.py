"""What Stage II starts from: each backbone's statistics, the start images, and whether a checkpoint fits."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..backbones import FrozenBackbone, load_backbone
from ..baselines import centroid_positions, fetch_rows, kmeans_positions, random_positions, require_row_indices
from ..config import Config
from ..errors import StageInputError, UserError
from ..layout import FEATURES_DIR, IMAGES_FILE, STATISTICS_TENSORS, SYNTHETIC_JSON, RunLayout
from ..statistics import Statistics, cached_row_indices, load_feature_cache, open_config_split
from ..utils import available_memory, read_json
from .checkpoints import changed_settings, checkpoint_fingerprint, read_checkpoint, synthetic_inputs


@dataclass
class DistillTarget:
    """A distillation backbone with its Stage I statistics and the (member) config they belong to."""

    config: Config
    backbone: FrozenBackbone
    statistics: Statistics


def distill_targets(config: Config, device: torch.device) -> list[DistillTarget]:
    """The backbone(s) the images are distilled for: one, or every member of a joint run (``Config.members``)."""
    return [
        DistillTarget(member, load_backbone(member.backbone, device=device, normalization=member.data.normalization),
                      load_statistics(member))
        for member in config.members()
    ]


def check_targets(targets: list[DistillTarget]) -> None:
    """Every member's statistics must come from its backbone, and all of them from the same classes."""
    first = targets[0]
    for target in targets:
        backbone, statistics = target.backbone, target.statistics
        if backbone.feature_dim != statistics.feature_dim:
            raise UserError(
                f"Backbone {target.config.backbone!r} gives {backbone.feature_dim}-d features but the statistics in "
                f"{RunLayout(target.config.output_dir).statistics_dir} are {statistics.feature_dim}-d: they come from "
                "another backbone."
            )
        if statistics.class_names != first.statistics.class_names:
            raise UserError(
                f"The statistics of {target.config.backbone!r} have other classes than those of "
                f"{first.config.backbone!r}: re-run the 'statistics' stage for every listed backbone on the same dataset."
            )


def load_statistics(config: Config) -> Statistics:
    """Stage I's statistics: <output_dir>/statistics, or the folder / Hub repo named by ``statistics_from``."""
    from ..hub import statistics_dir

    directory = statistics_dir(config)
    if not (directory / STATISTICS_TENSORS).is_file():
        raise StageInputError(
            f"Stages {[stage for stage in config.stages if stage != 'statistics']} need "
            f"{directory}/{STATISTICS_TENSORS}: run the 'statistics' stage first (add it to --stages)."
        )
    return Statistics.load(directory)


def is_up_to_date(folder: Path, inputs: dict) -> bool:
    """Whether ``folder`` already holds the images of exactly these inputs (a finished, unchanged run)."""
    try:
        metadata = json.loads((folder / SYNTHETIC_JSON).read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("inputs") == inputs and (folder / IMAGES_FILE).is_file()


def _settings_before_start(config: Config) -> tuple[Config, list[Statistics], tuple[str, ...]]:
    """``config`` with init resolved, every member's statistics, and the settings only a started distillation
    resolves (syn_res auto needs the backbone; run_distill compares it then)."""
    statistics = [load_statistics(member) for member in config.members()]
    config = replace(config, distill=replace(config.distill, init=resolve_init(config.members()[0])))
    unresolved = ("distill.syn_res",) if config.distill.syn_res == "auto" else ()
    return config, statistics, unresolved


def check_resumable(config: Config, world_size: int) -> None:
    """Raise before anything is written when the existing checkpoint cannot be resumed by this run.

    Only meaningful when the statistics already exist (the 'statistics' stage is not part of this
    run; if it is, it invalidates the checkpoints itself when it changes the statistics).
    """
    config, statistics, unresolved = _settings_before_start(config)
    fingerprint = checkpoint_fingerprint(config, statistics, world_size)
    for rank in range(world_size):
        read_checkpoint(RunLayout(config.output_dir).checkpoint(rank), fingerprint, unresolved=unresolved)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_synthetic_current(config: Config) -> None:
    """Raise before anything is written when this run's synthetic/ holds images made from other inputs or settings
    than this run names: a stage that reads them without remaking them (evaluate, export) would describe them by
    the wrong settings (and export would publish those as the recipe of the set)."""
    folder = RunLayout(config.output_dir).synthetic_dir
    if not (folder / SYNTHETIC_JSON).is_file():
        return  # the stage that needs the images says to run 'distill'
    record = read_json(folder / SYNTHETIC_JSON, "a record of synthetic images",
                       f"delete {folder} and run the 'distill' stage again")
    recorded = record.get("inputs") if isinstance(record, dict) else None
    config, statistics, unresolved = _settings_before_start(config)
    expected = synthetic_inputs(config, statistics)
    recorded = recorded if isinstance(recorded, dict) else {}
    changed = changed_settings(recorded, expected, unresolved)
    if changed:
        details = "; ".join(f"{key} {_shown(recorded.get(key))} there, {_shown(expected.get(key))} here"
                            for key in changed)
        raise StageInputError(
            f"{folder} holds images made with different settings or inputs than this run's ({details}): run the "
            "'distill' stage with these settings (add it to --stages), or give the settings the images were made with."
        )


# Peak bytes of Stage II per float32 value of this process's synthetic images (3 x side^2 each), rounded up from the
# growth of the CPU peak memory (ru_maxrss) of 10 pyramid images from 256 to 1024 and 2048 px: x7.3-8.3 of the image
# bytes from noise, x10.6-10.7 from real start images. It holds the pyramid's levels, their gradients and Adam's two
# moments, the start offset, the decoded images and what autograd keeps of the decoding.
STAGE_II_BYTES_PER_VALUE = 4 * 12


def check_memory(config: Config, num_classes: int, device: torch.device, world_size: int = 1, *,
                 at_least: bool = False) -> None:
    """Refuse, before anything is allocated, synthetic images that cannot fit in the memory of ``device``;
    ``at_least``: ``num_classes`` is a lower bound (the classes are not known yet)."""
    side = config.distill.syn_res
    if side == "auto":
        return  # the backbone's input size, rounded up: never the problem
    images = -(-num_classes // world_size) * config.ipc
    needed = images * 3 * side * side * STAGE_II_BYTES_PER_VALUE
    available = available_memory(device)
    if available is None or needed <= available:
        return
    count = f"at least {images}" if at_least else str(images)
    raise UserError(
        f"`distill.syn_res` {side} needs about {_binary_size(needed)} for {count} synthetic images of {side}x{side} px "
        f"per process ({STAGE_II_BYTES_PER_VALUE // 4} float32 copies of each: the pyramid, its gradients, Adam's "
        f"moments, the decoded images), but {device.type.upper()} memory has {_binary_size(available)} available: "
        "lower `distill.syn_res` (auto: the power of two above the backbone's input size) or `ipc`."
    )


def _binary_size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:,.1f} MiB"


def resolve_init(config: Config) -> str:
    """``distill.init`` with ``auto`` replaced: centroids where Stage I cached the train split's features
    with row numbers (a local or non-streamed split), noise otherwise."""
    from ..hub import statistics_dir

    if config.distill.init != "auto":
        return config.distill.init
    if config.statistics_from:
        return "noise"
    indices = cached_row_indices(statistics_dir(config) / FEATURES_DIR, "train")
    return "centroids" if indices is not None and bool((indices >= 0).all()) else "noise"


def start_images(config: Config, statistics: Statistics) -> torch.Tensor | None:
    """The real train images every synthetic image starts from (all classes, class-major), or None for noise.

    Chosen in Stage I's feature cache of phi_d: ``centroids`` takes the image nearest to the class mean for
    ipc 1 (the Centroids baseline's image) and, for ipc > 1, the images nearest to the centres of a k-means
    of the class's features (distinct images that cover the class); ``nearest`` the ipc images nearest to the
    class mean mu_c (at ipc 1 the same image as ``centroids``; above, the class's most typical images rather
    than ones that cover it); ``centroids_noise`` the ``centroids`` images blended with uniform noise
    (:func:`blend_with_noise`); ``random`` draws ipc images per class. Every process makes the same choice
    (seeded, read from the same cache) and keeps its own slice.
    """
    from ..hub import statistics_dir

    options = config.distill
    if options.init == "noise":
        return None
    cache = statistics_dir(config) / FEATURES_DIR
    try:
        features, labels, indices = load_feature_cache(cache, "train")
    except StageInputError:
        raise StageInputError(
            f"distill.init: {options.init} starts from real train images chosen in Stage I's feature cache, and "
            f"{cache} has none: run the 'statistics' stage (a published statistics repo carries no feature cache), "
            "or use distill.init: noise."
        ) from None
    require_row_indices(indices, config.train_split)
    num_classes = statistics.num_classes
    if options.init == "random":
        positions = random_positions(labels, num_classes, config.ipc, config.seed)
    elif options.init == "nearest" or config.ipc == 1:
        positions = centroid_positions(features, labels, statistics.class_means, config.ipc)
    else:
        positions = kmeans_positions(features, labels, num_classes, config.ipc, config.seed)
    images, _ = fetch_rows(
        open_config_split(config, config.train_split), indices[positions], options.syn_res,
        batch_size=config.data.batch_size, num_workers=config.data.num_workers,
    )
    if options.init == "centroids_noise":
        images = blend_with_noise(images, options.init_noise, config.seed)
    return images


def blend_with_noise(images: torch.Tensor, weight: float, seed: int) -> torch.Tensor:
    """``(1 - weight) * images + weight * U(0, 1)`` noise drawn from ``seed`` (the same on every process): a data
    start the optimiser can move further than a real image, while the class's layout is still there."""
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed))
    return (1 - weight) * images + weight * noise


def resolve_settings(config: Config, targets: list[DistillTarget]) -> Config:
    """``config`` with syn_res a number (auto: the largest any listed backbone needs, so none upsamples) and init a
    concrete start, as synthetic.json and the fingerprint record them; the targets' configs get the same."""
    resolved = replace(config.distill, syn_res=max(
        config.distill.resolution(target.backbone.image_size, config.data.crop_ratio) for target in targets),
        init=resolve_init(targets[0].config))
    for target in targets:
        target.config = replace(target.config, distill=resolved)
    return replace(config, distill=resolved)

