"""Stage II: optimise ``ipc`` synthetic images per class so that their flow matches the statistical flow.

One loop serves SFM (and its TCDD/NCDD ablations) and the LGM baseline. Under Accelerate the
classes are divided between processes: each process forwards only its own images, the
per-class feature sums are all-reduced *with autograd*, every process computes the same
global loss, and gradients reach only its own images. Every random number is a function of
(seed, step, global image index), so 1 and N processes, or an interrupted and resumed run,
produce the same images.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from accelerate.logging import get_logger

from .augment import AugmentConfig, augment
from .backbones import FrozenBackbone, load_backbone
from .baselines import centroid_positions, fetch_rows, kmeans_positions, random_positions, require_row_indices
from .config import Config, DistillOptions
from .data import BalancedRealStream, as_float
from .errors import RunStopped, StageInputError, UserError
from .objectives import (
    centre_flow_loss, decoupled_centre_loss, flow_cosine, linear_head_gradient, random_linear_head, sfm_loss,
)
from .progress import progress as track
from .pyramid import build_images, growth_due
from .registry import DISTILL_METHODS
from .layout import (
    FEATURES_DIR, IMAGES_FILE, PREVIEW_FILE, STATISTICS_TENSORS, SYNTHETIC_JSON, RunLayout,
)
from .names import short_name
from .statistics import Statistics, cached_row_indices, load_feature_cache, open_config_split
from .tracking import log_images
from .utils import atomic_path, save_tensors_atomically, write_text_atomically
from .visualize import save_preview

logger = get_logger(__name__)

# Offsets that keep the synthetic and the real augmentation streams apart.
SYNTHETIC_STREAM, REAL_STREAM = 0, 1 << 20


class NonFiniteLossError(RunStopped):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class ClassShare:
    """The contiguous block of classes (and so of synthetic images) one process owns."""

    first_class: int
    stop_class: int
    ipc: int

    @property
    def classes(self) -> list[int]:
        return list(range(self.first_class, self.stop_class))

    @property
    def first_image(self) -> int:
        return self.first_class * self.ipc

    @property
    def num_images(self) -> int:
        return (self.stop_class - self.first_class) * self.ipc

    def labels(self) -> torch.Tensor:
        return torch.arange(self.first_class, self.stop_class).repeat_interleave(self.ipc)


def class_share(num_classes: int, ipc: int, rank: int, world_size: int) -> ClassShare:
    if world_size > num_classes:
        raise UserError(f"{world_size} processes for {num_classes} classes: use at most one process per class.")
    return ClassShare(num_classes * rank // world_size, num_classes * (rank + 1) // world_size, ipc)


def _sum_across_processes(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Differentiable all-reduce; the backward pass sums the identical gradients of every process."""
    if world_size == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def _backbone_features(backbone, views: torch.Tensor, options: DistillOptions) -> torch.Tensor:
    """Features [N, D] of ``views``; with ``checkpoint_chunk`` the graph keeps only each chunk's input.

    Checkpointed chunks are forwarded without storing activations and re-run one at a time in the
    backward pass, so the peak holds one chunk's activations for about one extra forward.
    """
    bf16 = options.mixed_precision == "bf16"
    precision = torch.autocast(views.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    chunk = options.checkpoint_chunk
    with precision:
        if chunk <= 0 or not (torch.is_grad_enabled() and views.requires_grad):
            return backbone(views).float()
        return torch.cat([
            torch.utils.checkpoint.checkpoint(backbone, part, use_reentrant=False).float()
            for part in views.split(chunk)
        ])


@dataclass
class DistillContext:
    """Everything a step needs that does not change between steps."""

    config: Config
    backbone: FrozenBackbone
    statistics: Statistics
    target_means: torch.Tensor
    target_flow: torch.Tensor
    share: ClassShare
    augment_config: AugmentConfig
    world_size: int
    real_stream: BalancedRealStream | None = None
    fixed_head: tuple[torch.Tensor, torch.Tensor] | None = None
    # Labels of this process's synthetic images, kept on the device: a copy per step would sync the host.
    synthetic_labels: torch.Tensor = field(init=False)
    # (context, images, step) -> loss: the per-step loss of `distill.method`.
    method_loss: Callable = field(init=False)

    def __post_init__(self) -> None:
        self.synthetic_labels = self.share.labels().to(self.target_means.device)
        self.method_loss = DISTILL_METHODS[self.config.distill.method].loss_function()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy that does not make the host wait for the queued GPU work (pinned, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def synthetic_class_sums(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """Per-class sums [C, D] of this process's image features, averaged over augmentation rounds."""
    options = context.config.distill
    features = 0
    for round_index in range(options.aug_rounds):
        views = augment(
            images, context.backbone.image_size, context.augment_config,
            seed=context.config.seed + SYNTHETIC_STREAM, step=step * options.aug_rounds + round_index,
            index_offset=context.share.first_image,
        )
        features = features + _backbone_features(context.backbone, views, options)
    features = features / options.aug_rounds
    sums = torch.zeros(context.statistics.num_classes, features.shape[1], device=features.device)
    return sums.index_add(0, context.synthetic_labels, features)


def synthetic_centres(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """The synthetic class centres [C, D] of all processes' images (this process's share carries the graph)."""
    sums = _sum_across_processes(synthetic_class_sums(context, images, step), context.world_size)
    return sums / context.share.ipc


def sfm_step_loss(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """SFM (Eq. 9): 1 - cos between the statistical flow and the flow of the synthetic class centres."""
    return centre_flow_loss(synthetic_centres(context, images, step), context.target_means, context.target_flow)


def decoupled_step_loss(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """TCDD / NCDD (Tab. 3): the authors' decoupled MSE on the synthetic class centres."""
    return decoupled_centre_loss(synthetic_centres(context, images, step), context.target_means,
                                 context.target_flow, context.config.distill.resolved_alpha)


def _lgm_head(context: DistillContext, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head of this step: one per run (lgm_w_mode fixed), else a new random one per step."""
    num_classes, dim = context.statistics.num_classes, context.statistics.feature_dim
    if context.config.distill.lgm_w_mode == "fixed":
        if context.fixed_head is None:
            weight, bias = random_linear_head(num_classes, dim, generator=torch.Generator().manual_seed(context.config.seed))
            context.fixed_head = (weight.to(device), bias.to(device))
        return context.fixed_head
    generator = torch.Generator().manual_seed(context.config.seed * 1_000_003 + step)
    weight, bias = random_linear_head(num_classes, dim, generator=generator)
    return _to_device(weight, device), _to_device(bias, device)


def _head_gradient_share(features, labels, weight, bias, analytic: bool, share: float) -> torch.Tensor:
    grad_weight, grad_bias = linear_head_gradient(features, labels, weight, bias, analytic=analytic)
    return torch.cat([grad_weight.flatten(), grad_bias]) * share


def lgm_step_loss(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """LGM: 1 - cos between the linear-head gradients of a real batch and of the synthetic images (Eq. 1-3).

    Each process contributes the gradient share of its own classes (real and synthetic); the
    shares are summed across processes, the real side without a graph.
    """
    options, share = context.config.distill, context.share
    device = images.device
    weight, bias = _lgm_head(context, step, device)
    analytic = options.lgm_w_mode == "analytic"
    num_classes = context.statistics.num_classes
    syn_views = [
        augment(
            images, context.backbone.image_size, context.augment_config,
            seed=context.config.seed + SYNTHETIC_STREAM, step=step * options.aug_rounds + round_index,
            index_offset=share.first_image,
        )
        for round_index in range(options.aug_rounds)
    ]
    syn_features = _backbone_features(context.backbone, torch.cat(syn_views), options)
    syn_labels = context.synthetic_labels.repeat(options.aug_rounds)
    total_syn = num_classes * share.ipc * options.aug_rounds
    synthetic = _head_gradient_share(syn_features, syn_labels, weight, bias, analytic, len(syn_labels) / total_syn)
    with torch.no_grad():
        # The synthetic forward above is only queued on a GPU; reading the real batch overlaps with it.
        real_images, real_labels = context.real_stream.draw()
        real_views = augment(
            as_float(_to_device(real_images, device)), context.backbone.image_size, context.augment_config,
            seed=context.config.seed + REAL_STREAM, step=step,
            index_offset=share.first_class * share.ipc * options.aug_rounds,
        )
        real_features = _backbone_features(context.backbone, real_views, options)
        real = _head_gradient_share(
            real_features, _to_device(real_labels, device), weight, bias, analytic, len(real_labels) / total_syn
        )
        real = _sum_across_processes(real, context.world_size)
    synthetic = _sum_across_processes(synthetic, context.world_size)
    return 1 - flow_cosine(real, synthetic)


def compute_loss(context: DistillContext, images: torch.Tensor, step: int) -> torch.Tensor:
    """The loss of the distillation method (``registry.DISTILL_METHODS``) at ``step``."""
    return context.method_loss(context, images, step)


# ---------------------------------------------------------------------------------------------
# Checkpoints: pyramid levels, optimiser state, step, RNG states; one file per process.


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or that was made from other inputs or settings than this run's."""


def _fingerprint(config: Config, statistics: list[Statistics], world_size: int) -> dict:
    """The inputs and settings a checkpoint is only valid for (iterations may grow; logging may change).

    ``statistics``: those of every distillation backbone, in the order of ``config.backbones``; a joint
    set records each member's digest by backbone, so that a change in any of them is seen.
    """
    options = {f"distill.{key}": value for key, value in asdict(config.distill).items()}
    for free in ("iterations", "checkpoint_every", "preview_every", "log_every", "compile", "checkpoint_chunk"):
        options.pop(f"distill.{free}")
    digests = [member.digest for member in statistics]
    return {**options, "ipc": config.ipc, "seed": config.seed, "backbone": config.backbone,
            "statistics.non_target": config.statistics.non_target, "world_size": world_size,
            "statistics": dict(zip(config.backbones, digests)) if config.is_joint else digests[0],
            "dataset": config.dataset, "dataset_config": config.dataset_config, "train_split": config.train_split}


def synthetic_inputs(config: Config, statistics: list[Statistics]) -> dict:
    """What the synthetic images are a function of: the checkpoint's inputs and the number of steps.

    The number of processes is left out: 1 and N processes make the same images.
    """
    inputs = _fingerprint(config, statistics, world_size=1)
    inputs.pop("world_size")
    return {**inputs, "distill.iterations": config.distill.iterations}


def _rng_state() -> dict:
    """Every RNG state as tensors and plain lists, so that the checkpoint loads with ``weights_only=True``."""
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    python_version, python_internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [numpy_name, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss,
                  numpy_gauss],
        "python": [python_version, list(python_internal), python_gauss],
    }


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_name, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state((numpy_name, numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss,
                         numpy_gauss))
    python_version, python_internal, python_gauss = state["python"]
    random.setstate((python_version, tuple(python_internal), python_gauss))


def save_checkpoint(path: Path, images, optimizer, step: int, fingerprint: dict, *, loss: float,
                    seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "levels": [level.detach().cpu() for level in images.levels],
        "optimizer": optimizer.state_dict(),
        "fingerprint": fingerprint,
        "rng": _rng_state(),
        # Kept so that a resumed run reports its whole time and a finished one its last loss.
        "loss": loss,
        "seconds": seconds,
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


CHECKPOINT_KEYS = ("step", "levels", "optimizer", "fingerprint", "rng", "loss", "seconds")


def read_checkpoint(path: Path, fingerprint: dict, unresolved: tuple[str, ...] = ()) -> dict | None:
    """The checkpoint at ``path`` when it belongs to this run (``unresolved`` keys not compared), None when
    there is none.

    Loaded with ``weights_only=True``: a checkpoint holds tensors and plain values only, so a
    crafted file cannot run code. Unreadable files and other runs' checkpoints raise
    :class:`CheckpointError` naming the file and what to do.
    """
    if not path.is_file():
        return None
    start_over = f"Delete {path.parent} to start distillation over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- truncated, empty, garbage or unsafe: all mean "not ours"
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({error.__class__.__name__}{': ' + reason if reason else ''}): it is "
            f"truncated, empty or not a checkpoint of this version of sfm-hf. {start_over}."
        ) from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"Checkpoint {path} is not a checkpoint of this version of sfm-hf. {start_over}.")
    changed = sorted(
        key for key in set(state["fingerprint"]) | set(fingerprint)
        if key not in unresolved and state["fingerprint"].get(key) != fingerprint.get(key)
    )
    if changed:
        raise CheckpointError(
            f"The checkpoint in {path.parent} belongs to a run with different settings or inputs "
            f"({', '.join(changed)}). Use a new output_dir, or delete that folder to start over."
        )
    return state


# ---------------------------------------------------------------------------------------------


def make_optimizer(images, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam on the image parameters; the fused kernel on CUDA (one launch for all levels)."""
    return torch.optim.Adam(images.parameters(), lr=lr, fused=device.type == "cuda")


def build_context(
    config: Config, backbone: FrozenBackbone, statistics: Statistics, *, rank: int, world_size: int,
    device: torch.device,
) -> DistillContext:
    """What every step of this process needs; a method that reads real images gets the train split's stream."""
    options = config.distill
    num_classes = statistics.num_classes
    share = class_share(num_classes, config.ipc, rank, world_size)
    context = DistillContext(
        config=config,
        backbone=backbone,
        statistics=statistics,
        target_means=statistics.class_means.to(device),
        target_flow=statistics.flow(config.statistics.non_target).to(device),
        share=share,
        augment_config=AugmentConfig(noise_std=options.noise_std, noise_p=options.noise_p, noise_mean=options.noise_mean),
        world_size=world_size,
    )
    if DISTILL_METHODS[options.method].reads_real_images:
        source = open_config_split(config, config.train_split)
        context.real_stream = BalancedRealStream(
            source, share.classes, config.ipc * options.aug_rounds, image_size=options.syn_res,
            crop_ratio=config.data.crop_ratio, batch_size=config.data.batch_size, num_workers=config.data.num_workers,
            rank=rank, world_size=world_size, seed=config.seed,
        )
    return context


def grow_if_due(images, optimizer: torch.optim.Adam, step: int, config: Config, device: torch.device):
    """Add a pyramid level when ``step`` is a growth step; returns the optimiser to use from now on."""
    options = config.distill
    if not (options.representation == "pyramid" and growth_due(step, options.pyramid_every) and images.can_grow()):
        return optimizer
    images.grow()
    previous = optimizer
    optimizer = make_optimizer(images, options.lr, device)
    if not options.reset_optimizer_on_growth:
        optimizer.state.update({p: previous.state[p] for p in images.parameters() if p in previous.state})
    return optimizer


def train_step(context: DistillContext, images, optimizer: torch.optim.Adam, step: int) -> torch.Tensor:
    """One update of the synthetic images; returns the loss detached and on the device (reading it syncs)."""
    loss = compute_loss(context, images(), step)
    # Every process computes the same loss; the all-reduce backward sums world_size identical
    # gradients, so each process back-propagates its 1/world_size share.
    (loss / context.world_size).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def joint_train_step(contexts: list[DistillContext], images, optimizer: torch.optim.Adam, step: int) -> torch.Tensor:
    """One update of a joint synthetic set against several backbones; returns the mean loss, detached.

    The images are decoded once; each backbone's loss / n is back-propagated to them in turn, so
    only one backbone's activations are alive at a time, and the summed gradient (that of the mean
    loss) then flows once through the image parameterisation.
    """
    pixels = images()
    leaf = pixels.detach().requires_grad_(True)
    total = torch.zeros((), device=pixels.device)
    for context in contexts:
        loss = compute_loss(context, leaf, step)
        (loss / (len(contexts) * context.world_size)).backward()
        total = total + loss.detach()
    pixels.backward(leaf.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(contexts)


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
                      _load_statistics(member))
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


def _load_statistics(config: Config) -> Statistics:
    """Stage I's statistics: <output_dir>/statistics, or the folder / Hub repo named by ``statistics_from``."""
    from .hub import statistics_dir

    directory = statistics_dir(config)
    if not (directory / STATISTICS_TENSORS).is_file():
        raise StageInputError(
            f"Stages {[stage for stage in config.stages if stage != 'statistics']} need "
            f"{directory}/{STATISTICS_TENSORS}: run the 'statistics' stage first (add it to --stages)."
        )
    return Statistics.load(directory)


def _gather_images(accelerator, local: torch.Tensor, shares: list[ClassShare]) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return local
    padded = accelerator.pad_across_processes(local.contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    rows = padded.shape[0]
    return torch.cat([gathered[rank * rows : rank * rows + share.num_images] for rank, share in enumerate(shares)])


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


def _up_to_date(folder: Path, inputs: dict) -> bool:
    """Whether ``folder`` already holds the images of exactly these inputs (a finished, unchanged run)."""
    try:
        metadata = json.loads((folder / SYNTHETIC_JSON).read_text())
    except (OSError, ValueError):
        return False
    return metadata.get("inputs") == inputs and (folder / IMAGES_FILE).is_file()


def check_resumable(config: Config, world_size: int) -> None:
    """Raise before anything is written when the existing checkpoint cannot be resumed by this run.

    Only meaningful when the statistics already exist (the 'statistics' stage is not part of this
    run; if it is, it invalidates the checkpoints itself when it changes the statistics).
    """
    statistics = [_load_statistics(member) for member in config.members()]
    config = replace(config, distill=replace(config.distill, init=resolve_init(config.members()[0])))
    fingerprint = _fingerprint(config, statistics, world_size)
    # syn_res auto is resolved from the backbone only when distillation starts; run_distill checks it then.
    unresolved = ("distill.syn_res",) if config.distill.syn_res == "auto" else ()
    for rank in range(world_size):
        read_checkpoint(RunLayout(config.output_dir).checkpoint(rank), fingerprint, unresolved=unresolved)


def resolve_init(config: Config) -> str:
    """``distill.init`` with ``auto`` replaced: centroids where Stage I cached the train split's features
    with row numbers (a local or non-streamed split), noise otherwise."""
    from .hub import statistics_dir

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
    of the class's features (distinct images that cover the class); ``random`` draws ipc images per class.
    Every process makes the same choice (seeded, read from the same cache) and keeps its own slice.
    """
    from .hub import statistics_dir

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
    elif config.ipc == 1:
        positions = centroid_positions(features, labels, statistics.class_means, 1)
    else:
        positions = kmeans_positions(features, labels, num_classes, config.ipc, config.seed)
    images, _ = fetch_rows(
        open_config_split(config, config.train_split), indices[positions], options.syn_res,
        batch_size=config.data.batch_size, num_workers=config.data.num_workers,
    )
    return images


def resolve_settings(config: Config, targets: list[DistillTarget]) -> Config:
    """``config`` with syn_res a number (auto: the largest any listed backbone needs, so none upsamples) and init a
    concrete start, as synthetic.json and the fingerprint record them; the targets' configs get the same."""
    resolved = replace(config.distill, syn_res=max(
        config.distill.resolution(target.backbone.image_size, config.data.crop_ratio) for target in targets),
        init=resolve_init(targets[0].config))
    for target in targets:
        target.config = replace(target.config, distill=resolved)
    return replace(config, distill=resolved)


@dataclass
class DistillRun:
    """What the loop of Stage II works on: this process's images and optimiser, and where it resumes from."""

    config: Config  # settings resolved (resolve_settings)
    targets: list[DistillTarget]
    contexts: list[DistillContext]
    shares: list[ClassShare]  # every process's classes, to gather the images
    start: torch.Tensor | None  # the real start images of all classes, or None for noise
    images: torch.nn.Module
    optimizer: torch.optim.Adam
    fingerprint: dict
    checkpoint_path: Path
    inputs: dict  # what synthetic.json records the images as a function of
    start_step: int = 0
    earlier_seconds: float = 0.0  # of the runs before a resume
    last_loss: torch.Tensor | None = None
    saved_step: int | None = None  # of the last checkpoint written or resumed from


def prepare_run(config: Config, accelerator, targets: list[DistillTarget], inputs: dict) -> DistillRun:
    """Contexts, start images and optimiser of this process, resumed from its checkpoint when one fits."""
    options = config.distill
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    check_targets(targets)
    if options.compile:
        for target in targets:
            target.backbone = torch.compile(target.backbone)
    statistics = targets[0].statistics
    contexts = [build_context(target.config, target.backbone, target.statistics, rank=rank, world_size=world_size,
                              device=device) for target in targets]
    share = contexts[0].share
    shares = [class_share(statistics.num_classes, config.ipc, r, world_size) for r in range(world_size)]
    # A joint set starts from the images chosen in its first backbone's feature cache.
    start = start_images(targets[0].config, statistics)
    local_start = None if start is None else start[share.first_image : share.first_image + share.num_images]
    images = build_images(
        options.representation, share.num_images, options.syn_res, seed=config.seed,
        decorrelate=options.decorrelate, index_offset=share.first_image, start=local_start,
    ).to(device)
    run = DistillRun(
        config, targets, contexts, shares, start, images, make_optimizer(images, options.lr, device),
        _fingerprint(config, [target.statistics for target in targets], world_size),
        RunLayout(config.output_dir).checkpoint(rank), inputs,
        last_loss=torch.full((), float("nan"), device=device),
    )
    _resume(run, accelerator)
    return run


def _resume(run: DistillRun, accelerator) -> None:
    """Load this process's checkpoint into ``run`` when one of these inputs and settings exists."""
    device, options, checkpoint_path = accelerator.device, run.config.distill, run.checkpoint_path
    state = read_checkpoint(checkpoint_path, run.fingerprint)
    if state is None:
        return
    try:
        run.images.load_levels([level.to(device) for level in state["levels"]])
        run.optimizer = make_optimizer(run.images, options.lr, device)
        run.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"Checkpoint {checkpoint_path} does not fit this run's images ({error}). Delete "
            f"{checkpoint_path.parent} to start distillation over."
        ) from None
    _restore_rng(state["rng"])
    run.start_step = run.saved_step = state["step"]
    run.earlier_seconds = state["seconds"]
    run.last_loss = torch.full((), state["loss"], device=device)
    if accelerator.is_main_process:
        logger.info(f"Stage II: resuming from step {run.start_step} ({checkpoint_path.parent}).")


def _stop_if_non_finite(run: DistillRun, first_bad_step: torch.Tensor) -> None:
    """Raise once a step's loss was NaN or infinite (read from the device only where the loop syncs anyway)."""
    bad = int(first_bad_step)
    if bad >= 0:
        options = run.config.distill
        kept = (
            f"The last good checkpoint (step {run.saved_step}) is kept in {run.checkpoint_path.parent}."
            if run.saved_step is not None else
            f"No checkpoint was written before it (distill.checkpoint_every: {options.checkpoint_every})."
        )
        raise NonFiniteLossError(
            f"Stage II stopped: the {options.method} loss became non-finite at step {bad}. {kept} Try a lower "
            "distill.lr or distill.mixed_precision: no."
        )


def optimise(run: DistillRun, accelerator) -> float:
    """The steps from ``run.start_step`` to ``distill.iterations``, with logging and checkpoints; returns the
    seconds of distillation in all (earlier runs included)."""
    config, options, device = run.config, run.config.distill, accelerator.device
    first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    progress = track(
        range(run.start_step, options.iterations), initial=run.start_step, total=options.iterations,
        desc=f"Stage II: {options.method}", unit="step", mode=config.progress,
        enabled=accelerator.is_local_main_process,
    )
    start_time = time.perf_counter()
    for step in progress:
        run.optimizer = grow_if_due(run.images, run.optimizer, step, config, device)
        if len(run.contexts) == 1:
            detached = train_step(run.contexts[0], run.images, run.optimizer, step)
        else:
            detached = joint_train_step(run.contexts, run.images, run.optimizer, step)
        first_bad_step = torch.where(
            (first_bad_step < 0) & ~torch.isfinite(detached), torch.full_like(first_bad_step, step), first_bad_step
        )
        run.last_loss = detached
        done = step + 1
        if done % options.log_every == 0 or done == options.iterations:
            _stop_if_non_finite(run, first_bad_step)
            value = float(run.last_loss)
            progress.set_postfix(loss=f"{value:.4f}")
            accelerator.log({"distill/loss": value}, step=done)
        if options.checkpoint_every and done % options.checkpoint_every == 0 and done < options.iterations:
            _stop_if_non_finite(run, first_bad_step)
            save_checkpoint(run.checkpoint_path, run.images, run.optimizer, done, run.fingerprint,
                            loss=float(run.last_loss), seconds=run.earlier_seconds + time.perf_counter() - start_time)
            run.saved_step = done
    progress.close()
    if options.iterations > run.start_step:
        _stop_if_non_finite(run, first_bad_step)
    return run.earlier_seconds + time.perf_counter() - start_time


def final_images(run: DistillRun, accelerator, seconds: float) -> torch.Tensor:
    """Every process's images gathered (all classes, on the CPU); the last checkpoint written."""
    options = run.config.distill
    with torch.no_grad():
        local = run.images().detach()
    final = _gather_images(accelerator, local, run.shares).cpu()
    if options.checkpoint_every:
        save_checkpoint(run.checkpoint_path, run.images, run.optimizer, max(run.start_step, options.iterations),
                        run.fingerprint, loss=float(run.last_loss), seconds=seconds)
    return final


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
                    inputs=run.inputs, saturated=saturated)
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


def run_distill(config: Config, accelerator) -> Path:
    """Stage II; writes ``<output_dir>/synthetic/`` and returns that folder: prepare (or resume), optimise, write."""
    folder = RunLayout(config.output_dir).synthetic_dir
    targets = distill_targets(config, accelerator.device)
    config = resolve_settings(config, targets)
    inputs = synthetic_inputs(config, [target.statistics for target in targets])
    if _up_to_date(folder, inputs):
        if accelerator.is_main_process:
            logger.info(f"Stage II: {folder} already holds the images of these inputs and settings; nothing to do.")
        return folder
    run = prepare_run(config, accelerator, targets, inputs)
    seconds = optimise(run, accelerator)
    final = final_images(run, accelerator, seconds)
    if accelerator.is_main_process:
        write_outputs(run, accelerator, final, seconds, folder)
    accelerator.wait_for_everyone()
    return folder


# A pixel "sits at 0 or 1" when it rounds to 0 or 255 in 8 bits.
SATURATION_TOLERANCE = 0.5 / 255
SATURATION_WARNING = 0.5


def saturated_fraction(images: torch.Tensor) -> float:
    """Share of the pixel values of ``images`` (in [0, 1]) that round to 0 or 255 in 8 bits."""
    saturated = (images <= SATURATION_TOLERANCE) | (images >= 1 - SATURATION_TOLERANCE)
    return float(saturated.float().mean())


def _all_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def write_synthetic(folder: Path, images, labels, statistics: Statistics, config: Config, seconds: float,
                    final_loss: float, agreements: dict[str, dict], *, inputs: dict, saturated: float) -> None:
    """``agreements``: the flow cosines per distillation backbone; a joint set records them by backbone
    (``flow_cosine_by_backbone``), a single-backbone set as ``flow_cosine``."""
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
        "seconds": round(seconds, 3),
        "final_loss": None if not math.isfinite(final_loss) else final_loss,
        **({"flow_cosine_by_backbone": agreements} if config.is_joint
           else {"flow_cosine": agreements[config.backbone]}),
        "saturated_fraction": round(saturated, 4),
        # What these images were made from: a later run compares it to decide whether they are current.
        "inputs": inputs,
    }
    write_text_atomically(folder / SYNTHETIC_JSON, json.dumps(metadata, indent=2))
    save_preview(images, labels, statistics.class_names, folder / PREVIEW_FILE)
