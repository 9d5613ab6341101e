"""Each method's per-step loss (SFM, TCDD/NCDD, LGM) and the context a step works on: this process's classes."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.utils.checkpoint

from ..augment import AugmentConfig, augment
from ..backbones import FrozenBackbone
from ..config import Config, DistillOptions
from ..data import BalancedRealStream, as_float
from ..errors import UserError
from ..objectives import (
    centre_flow_loss, decoupled_centre_loss, flow_cosine, linear_head_gradient, mean_spread_loss, random_linear_head,
)
from ..registry import DISTILL_METHODS
from ..statistics import Statistics, open_config_split


# Offsets that keep the synthetic and the real augmentation streams apart.
SYNTHETIC_STREAM, REAL_STREAM = 0, 1 << 20


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
    """SFM (Eq. 9): 1 - cos between the statistical flow and the flow of the synthetic class centres, plus
    ``distill.mean_spread_weight`` x :func:`~sfm_hf.objectives.mean_spread_loss` (Eq. 9 alone at 0)."""
    centres = synthetic_centres(context, images, step)
    loss = centre_flow_loss(centres, context.target_means, context.target_flow)
    weight = context.config.distill.mean_spread_weight
    if weight:
        loss = loss + weight * mean_spread_loss(centres, context.target_means)
    return loss


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
        augment_config=AugmentConfig.from_options(
            config.augment, noise_std=options.noise_std, noise_p=options.noise_p, noise_mean=options.noise_mean),
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

