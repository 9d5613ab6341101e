"""One training run: its setup, per-step batches of features, Adam phases and the authors / converge protocols."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..augment import augment
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
    # phi_e features of a slice of the real train split: the plateau check of protocol converge.
    validation_features: torch.Tensor | None = None
    validation_labels: torch.Tensor | None = None
    # evaluate.view_bank > 0: this trial's views, shared by all its trainings.
    view_bank: ViewBank | None = None
    # converge with fresh views: the bank the plateau search runs on before one fresh-view training.
    search_bank: ViewBank | None = None
    progress: TrainingProgress | None = None


@dataclass
class TrainingProgress:
    """Where a training reports its steps: the stage's clock, the training's name, the progress mode."""

    clock: StageClock
    label: str
    mode: str = "auto"
    enabled: bool = True

    def phase(self, steps: int, what: str = "") -> StepProgress:
        return StepProgress(self.clock, steps, desc=f"Stage III: {self.label}{what} ({steps} steps)",
                            mode=self.mode, enabled=self.enabled)


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

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        setup = self.setup
        if len(self.queue) < self.batch:
            self.queue = torch.cat([self.queue, torch.randperm(len(setup.images), generator=self.generator)])
        chosen, self.queue = self.queue[: self.batch], self.queue[self.batch :]
        chosen = chosen.to(setup.images.device)
        if setup.view_bank is not None:
            view = (self.step_offset + step) % setup.view_bank.views
            eval_features = setup.view_bank.features(setup.eval_backbone, self.view_size)[view, chosen]
            distill_features = None
            if self.need_distill:
                distill_features = setup.view_bank.features(setup.distill_backbone, self.view_size)[view, chosen]
            return eval_features, distill_features, setup.labels[chosen]
        with torch.no_grad():
            views = augment(setup.images[chosen], self.view_size, TRAIN_AUGMENTATION, seed=setup.seed,
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
    """One training run of a parameter group: its plot curve, length and (converge) plateau check."""

    curve: list[tuple[int, float]]
    steps: int
    plateau: bool | None = None
    validation_accuracy: float | None = None
    search_views: int | None = None  # its length was found on a bank of this many views (then trained fresh)


def _run_phase(setup: TrialSetup, groups: list[dict[str, Any]], loss: Callable, predictor: nn.Module, *,
               need_distill: bool, step_offset: int, steps: int, steps_per_decay: int, what: str = "") -> Phase:
    """Adam for ``steps`` steps, cosine over them, the schedule stepped once every ``steps_per_decay`` steps."""
    options = setup.options
    batches = AugmentedFeatures(setup, need_distill, step_offset)
    report = (setup.progress or _SILENT).phase(steps, what)
    # Copies: optimiser and schedule write their lr into the group dicts, and a retraining must start afresh.
    # Fused: one kernel per step instead of a dozen; with a bank the step is otherwise a few small matmuls, and a
    # 1280 x 1280 CI projector's Adam update took 4.4-5.0 ms of foreach kernels against 1.7-2.1 ms fused (2 CPU cores).
    optimizer = torch.optim.Adam([dict(group) for group in groups], fused=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps // steps_per_decay))
    checkpoints = _curve_steps(steps, options.curve_points)
    curve = [(step_offset, accuracy(predictor, setup.eval_features, setup.eval_labels))] if checkpoints else []
    for step in range(steps):
        value = loss(*batches(step))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if (step + 1) % steps_per_decay == 0:
            scheduler.step()
        if step + 1 in checkpoints:
            curve.append((step_offset + step + 1, accuracy(predictor, setup.eval_features, setup.eval_labels)))
        if step + 1 < steps:
            report.advance()
    phase = Phase(curve, steps)
    if options.protocol == "converge" and setup.validation_features is not None:
        phase.validation_accuracy = accuracy(predictor, setup.validation_features, setup.validation_labels)
    report.finish("" if phase.validation_accuracy is None
                  else f"validation accuracy {100 * phase.validation_accuracy:.1f}%")
    return phase


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

    authors: ``epochs`` epochs of ceil(N / batch) steps, cosine stepped per epoch. converge:
    ``iterations`` steps (cosine), then again from the same start for twice as long, and so on while
    the longer training's accuracy on the validation slice of real train features is more than
    ``plateau_tolerance`` above the shorter one's (up to ``max_iterations``). Comparing whole
    trainings, not the tail of one: under a cosine schedule the last part of any run is nearly flat,
    however far from its plateau the model is. The slice is train data: no choice sees the eval split.

    With fresh views and a ``search_bank`` the doubling runs on the bank (each retraining then costs linear
    steps only) and the length it ends at is trained once more, from the same start, with fresh views.
    """
    options = setup.options
    groups = [{**group, "params": list(group["params"])} for group in groups]
    if options.protocol == "authors":
        per_epoch = math.ceil(len(setup.images) / min(options.batch_size, len(setup.images)))
        return _run_phase(setup, groups, loss, predictor, need_distill=need_distill, step_offset=step_offset,
                          steps=options.epochs * per_epoch, steps_per_decay=per_epoch)
    parameters = [parameter for group in groups for parameter in group["params"]]
    start = [parameter.detach().clone() for parameter in parameters]

    def restart() -> None:
        with torch.no_grad():
            for parameter, initial in zip(parameters, start):
                parameter.copy_(initial)

    search_on_bank = (setup.view_bank is None and setup.search_bank is not None
                      and setup.validation_features is not None and options.max_iterations >= 2 * options.iterations)
    searched = dataclasses.replace(setup, view_bank=setup.search_bank) if search_on_bank else setup
    what = " plateau search" if search_on_bank else ""
    steps, shorter = options.iterations, None
    while True:
        phase = _run_phase(searched, groups, loss, predictor, need_distill=need_distill, step_offset=step_offset,
                           steps=steps, steps_per_decay=1, what=what)
        if phase.validation_accuracy is None:
            break
        if shorter is not None and phase.validation_accuracy - shorter <= options.plateau_tolerance:
            phase.plateau = True
            break
        if 2 * steps > options.max_iterations:
            phase.plateau = False
            break
        shorter = phase.validation_accuracy
        restart()
        steps *= 2
    if not search_on_bank:
        return phase
    restart()
    final = _run_phase(setup, groups, loss, predictor, need_distill=need_distill, step_offset=step_offset,
                       steps=phase.steps, steps_per_decay=1)
    final.plateau, final.search_views = phase.plateau, setup.search_bank.views
    return final
