"""One training run: its setup, per-step batches of features, Adam in cosine cycles, the fixed / converge / authors
protocols."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..augment import AugmentConfig, augment
from ..backbones import FrozenBackbone
from ..config import EvaluateOptions
from ..probe import accuracy
from ..progress import StageClock, StepProgress
from .views import TRAIN_AUGMENTATION, ViewBank


@dataclass
class TrialSetup:
    """Everything one training needs; tensors on the training device."""

    images: torch.Tensor  # float [N, 3, R, R] in [0, 1]
    labels: torch.Tensor
    eval_backbone: FrozenBackbone
    distill_backbone: FrozenBackbone
    golden: nn.Linear  # frozen
    eval_features: torch.Tensor  # phi_e features of the eval split (final score and plot only)
    eval_labels: torch.Tensor
    options: EvaluateOptions
    seed: int
    # real_eval_data: phi_e features of a slice of the real train split (protocol converge's plateau check, fused's
    # weight, ridge_choice validation).
    validation_features: torch.Tensor | None = None
    validation_labels: torch.Tensor | None = None
    # evaluate.view_bank > 0: this trial's views, shared by all its trainings.
    view_bank: ViewBank | None = None
    progress: TrainingProgress | None = None
    # evaluate.projector_anchors > 0: per class, phi_e's mean feature [C, D_e] and phi_d's class mean from Stage I
    # [C, D_d]: pairs the projector fit adds to its views. On the distillation backbone both are the class mean.
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None
    # The anchors' phi_e side is the mean of real TRAIN features through the eval backbone (real_eval_data).
    real_anchors: bool = False
    # The flip and crop of its fresh views (a view bank holds its own): the run's `augment` section.
    augmentation: AugmentConfig = TRAIN_AUGMENTATION
    # This trial's trained models by recorded mode (trainers.TrainedModel), shared by the trial's trainings on one
    # eval backbone so that a mode combining others (fused) reuses them instead of training them again.
    trained: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingProgress:
    """Where a training reports its steps: the stage's clock, the training's name, the progress mode."""

    clock: StageClock
    label: str
    mode: str = "auto"
    enabled: bool = True

    def cycle(self, steps: int, steps_before: int) -> StepProgress:
        what = f"{steps} steps" if not steps_before else f"{steps} more steps, to {steps_before + steps}"
        return StepProgress(self.clock, steps, desc=f"Stage III: {self.label} ({what})", mode=self.mode,
                            enabled=self.enabled, steps_before=steps_before)


def effective_settings(options: EvaluateOptions, images: int) -> dict[str, Any]:
    """Batch and learning rates a training on ``images`` images uses under ``options.protocol``."""
    batch = min(options.batch_size, images)
    scale = batch / 256 if options.protocol == "authors" else 1.0
    return {"protocol": options.protocol, "batch_size": batch, "head_lr": options.lr * scale,
            "projector_lr": options.projector_lr * scale}


class AugmentedFeatures:
    """Features of an augmented batch per step: phi_e, and phi_d of the very same views when asked.

    Fresh views every step (each image's own view of the step), or with a view bank the same view while the bank
    holds it: view ``step mod views``, so views recur only after ``views`` steps.
    """

    def __init__(self, setup: TrialSetup, need_distill: bool, step_offset: int = 0) -> None:
        self.setup = setup
        self.need_distill = need_distill
        self.step_offset = step_offset
        self.batch = min(setup.options.batch_size, len(setup.images))
        self.generator = torch.Generator().manual_seed(setup.seed)
        self.queue = torch.empty(0, dtype=torch.long)
        sizes = [setup.eval_backbone.image_size] + ([setup.distill_backbone.image_size] if need_distill else [])
        # Each backbone resizes the shared view to its own input; crop at the larger size so neither upsamples.
        self.view_size = max(sizes)
        # The bank's [views, N, D] features (phi_e, phi_d or None), fetched here so that they are built before the
        # training's progress starts: its step rate then times steps, not the bank's forwards (which report their own).
        self.banked = None
        if setup.view_bank is not None:
            bank = setup.view_bank
            self.banked = (bank.features(setup.eval_backbone, self.view_size),
                           bank.features(setup.distill_backbone, self.view_size) if need_distill else None)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        setup = self.setup
        if len(self.queue) < self.batch:
            self.queue = torch.cat([self.queue, torch.randperm(len(setup.images), generator=self.generator)])
        chosen, self.queue = self.queue[: self.batch], self.queue[self.batch :]
        chosen = chosen.to(setup.images.device)
        if self.banked is not None:
            view = (self.step_offset + step) % setup.view_bank.views
            eval_bank, distill_bank = self.banked
            distill_features = None if distill_bank is None else distill_bank[view, chosen]
            return eval_bank[view, chosen], distill_features, setup.labels[chosen]
        with torch.no_grad():
            views = augment(setup.images[chosen], self.view_size, setup.augmentation, seed=setup.seed,
                            step=self.step_offset + step, image_ids=chosen)
            eval_features = setup.eval_backbone(views)
            distill_features = None
            if self.need_distill:
                same = setup.distill_backbone is setup.eval_backbone
                distill_features = eval_features if same else setup.distill_backbone(views)
        return eval_features, distill_features, setup.labels[chosen]


_SILENT = TrainingProgress(StageClock(1), "", mode="off", enabled=False)


def _curve_steps(iterations: int, points: int) -> set[int]:
    return {round(iterations * k / points) for k in range(1, points + 1)} if points else set()


@dataclass
class Phase:
    """One training of a parameter group: its plot curve, length and (converge) plateau check."""

    curve: list[tuple[int, float]]
    steps: int
    plateau: bool | None = None
    validation_accuracy: float | None = None


class _Run:
    """One Adam run of a parameter group, continued cycle after cycle: the same batches (views keep their step
    numbers, the image order its permutation stream), the same optimiser moments, a new cosine cycle each time."""

    def __init__(self, setup: TrialSetup, groups: list[dict[str, Any]], loss: Callable, predictor: nn.Module, *,
                 need_distill: bool, step_offset: int) -> None:
        self.setup, self.loss, self.predictor = setup, loss, predictor
        self.batches = AugmentedFeatures(setup, need_distill, step_offset)
        self.step_offset, self.done = step_offset, 0
        # Fused: one kernel per step instead of a dozen; with a bank the step is otherwise a few small matmuls, and a
        # 1280 x 1280 CI projector's Adam update took 4.4-5.0 ms of foreach kernels against 1.7-2.1 ms fused
        # (2 CPU cores).
        self.optimizer = torch.optim.Adam(groups, fused=True)
        self.curve: list[tuple[int, float]] = []

    def cycle(self, steps: int, steps_per_decay: int) -> float | None:
        """``steps`` more steps under a cosine from the groups' lr down to 0, the schedule stepped once every
        ``steps_per_decay`` steps; the validation accuracy at its end (converge with a validation slice)."""
        setup, options = self.setup, self.setup.options
        for group in self.optimizer.param_groups:
            # A cosine schedule that starts at epoch 0 takes the group's current lr, which the last cycle left at 0.
            group["lr"] = group.setdefault("initial_lr", group["lr"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, steps // steps_per_decay))
        first = self.step_offset + self.done
        report = (setup.progress or _SILENT).cycle(steps, self.done)
        checkpoints = _curve_steps(steps, options.curve_points)
        if checkpoints and not self.curve:
            self.curve.append((first, accuracy(self.predictor, setup.eval_features, setup.eval_labels)))
        for step in range(steps):
            value = self.loss(*self.batches(self.done + step))
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.optimizer.step()
            if (step + 1) % steps_per_decay == 0:
                scheduler.step()
            if step + 1 in checkpoints:
                self.curve.append((first + step + 1, accuracy(self.predictor, setup.eval_features, setup.eval_labels)))
            if step + 1 < steps:
                report.advance()
        self.done += steps
        validation = None
        if options.protocol == "converge" and setup.validation_features is not None:
            validation = accuracy(self.predictor, setup.validation_features, setup.validation_labels)
        report.finish("" if validation is None else f"validation accuracy {100 * validation:.1f}%")
        return validation


def optimise(
    setup: TrialSetup,
    groups: list[dict[str, Any]],
    loss: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
    predictor: nn.Module,
    *,
    need_distill: bool,
    step_offset: int = 0,
) -> Phase:
    """Train ``groups`` on ``loss`` under ``options.protocol``.

    fixed: ``iterations`` steps (cosine to 0). authors: ``epochs`` epochs of ceil(N / batch) steps, cosine stepped
    per epoch. converge (real_eval_data): ``iterations`` steps (cosine to 0), then the same run continues with a
    new cosine cycle as long as all steps before it (doubling its length), and again, while a cycle raises the
    accuracy on the validation slice of real train features by more than ``plateau_tolerance`` (up to
    ``max_iterations`` steps in all). Comparing the ends of
    whole cycles, each annealed to lr 0, not the tail of one cycle: under a cosine schedule the last part of any
    cycle is nearly flat, however far from its plateau the model is. A run of T steps costs T steps, where
    retraining from the start at each doubling cost nearly 2T. The slice is train data: no choice sees the eval
    split.
    """
    options = setup.options
    # Copies: the optimiser writes its lr schedule into its groups, and the caller's dicts stay as given.
    groups = [{**group, "params": list(group["params"])} for group in groups]
    run = _Run(setup, groups, loss, predictor, need_distill=need_distill, step_offset=step_offset)
    if options.protocol == "authors":
        per_epoch = math.ceil(len(setup.images) / min(options.batch_size, len(setup.images)))
        run.cycle(options.epochs * per_epoch, steps_per_decay=per_epoch)
        return Phase(run.curve, run.done)
    if options.protocol == "fixed":
        run.cycle(options.iterations, steps_per_decay=1)
        return Phase(run.curve, run.done)
    validation, shorter, plateau = run.cycle(options.iterations, steps_per_decay=1), None, None
    while validation is not None:
        if shorter is not None and validation - shorter <= options.plateau_tolerance:
            plateau = True
            break
        if 2 * run.done > options.max_iterations:
            plateau = False
            break
        shorter, validation = validation, run.cycle(run.done, steps_per_decay=1)
    return Phase(run.curve, run.done, plateau, validation)
