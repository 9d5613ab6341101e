"""One training function per evaluation mode (heads, projectors incl. the ridge fit) and one scored trial."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..probe import accuracy, uniform_linear
from ..registry import EVALUATION_MODES, EvaluationMode, parse_mode
from ..ridge import RidgeMoments, choose_lambda, fit_ridge, lambda_grid, prior_map, ridge_solutions
from .training import TrialSetup, effective_settings, AugmentedFeatures, Phase, optimise


@dataclass
class TrialOutcome:
    accuracy: float
    curve: list[tuple[int, float]]
    seconds: float
    predictor: nn.Module  # eval features -> logits
    projector: nn.Linear | None = None
    details: dict[str, Any] = field(default_factory=dict)  # protocol, effective lrs, steps, batch, plateau


def _as_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


def _validation_choice(setup: TrialSetup, candidates: list[nn.Module]) -> tuple[int, float]:
    """The index and accuracy of the candidate predictor most accurate on the validation slice of real TRAIN
    features (the first of equals): what ridge_choice validation and fused choose by, never the eval split."""
    scores = [accuracy(candidate, setup.validation_features, setup.validation_labels) for candidate in candidates]
    return scores.index(max(scores)), max(scores)


def fit_ridge_projector(setup: TrialSetup) -> tuple[nn.Linear, dict[str, Any]]:
    """The projector P: D_e -> D_d in one solve (``evaluate.projector: ridge``); returns it and what was chosen.

    The views are those the SGD projector would see (same augmentation, same view through both
    backbones), with the class-mean anchors (``projector_anchors``) beside every batch of them as the SGD
    projector has them. The penalty (``ridge_choice``) is the one with the least held-out error over
    ``ridge_folds`` groups of classes, each held out in turn (a choice made on the train images' views alone),
    or the one whose CI predictor is most accurate on the validation slice of real train features.
    """
    options = setup.options
    eval_dim, distill_dim = setup.eval_backbone.feature_dim, setup.golden.in_features
    batches = AugmentedFeatures(setup, need_distill=True)
    folds = min(options.ridge_folds, setup.golden.out_features)
    moments = RidgeMoments.zeros(folds, eval_dim, distill_dim)
    draws = math.ceil(options.ridge_views / batches.batch)
    for step in range(draws):
        eval_features, distill_features, labels = batches(step)
        moments.add(eval_features, distill_features, labels % folds)
    if setup.anchors is not None:
        # The SGD objective summed over `draws` steps: each batch of views has the C anchor pairs beside it.
        anchor_eval, anchor_distill = setup.anchors
        classes = torch.arange(len(anchor_eval), device=anchor_eval.device)
        moments.add(anchor_eval, anchor_distill, classes % folds, weight=options.projector_anchors * draws)
    prior = prior_map(eval_dim, distill_dim)
    grid = lambda_grid(moments, options.ridge_lambdas)
    if options.ridge_choice == "validation":
        device = setup.images.device
        solutions = [_as_linear(weight.float(), bias.float()).to(device)
                     for weight, bias in ridge_solutions(moments, grid, prior)]
        best, _ = _validation_choice(setup, [nn.Sequential(projector, setup.golden) for projector in solutions])
        penalty, projector = grid[best], solutions[best]
    else:
        penalty, _ = choose_lambda(moments, grid, prior)
        projector = _as_linear(*(tensor.float() for tensor in fit_ridge(moments, penalty, prior)))
    chosen = {"ridge_lambda": penalty, "ridge_choice": options.ridge_choice, "ridge_views": draws * batches.batch,
              "ridge_batches": draws}
    return projector.to(setup.images.device), chosen


@dataclass
class TrainedModel:
    """What a mode's training leaves: eval features -> logits, the projector it trained, and its runs."""

    predictor: nn.Module
    phases: list[Phase]  # none for a ridge ci: nothing is trained by gradient
    projector: nn.Linear | None = None
    chosen: dict[str, Any] = field(default_factory=dict)  # what a ridge projector fit chose, recorded per trial


def _learning_rates(setup: TrialSetup) -> tuple[float, float]:
    settings = effective_settings(setup.options, len(setup.images))
    return settings["head_lr"], settings["projector_lr"]


def _new_head(setup: TrialSetup, in_features: int, generator: torch.Generator, *, inherit: bool) -> nn.Linear:
    """A linear head to the classes: random from ``generator``, or a trainable copy of the golden classifier."""
    if inherit:
        return copy.deepcopy(setup.golden).requires_grad_(True)
    return uniform_linear(in_features, setup.golden.out_features, generator).to(setup.images.device)


def _new_projector(setup: TrialSetup, generator: torch.Generator) -> nn.Linear:
    """A random linear projector P: D_e -> D_d."""
    return uniform_linear(setup.eval_backbone.feature_dim, setup.golden.in_features, generator).to(setup.images.device)


@dataclass
class _FittedProjector:
    """P: D_e -> D_d fitted alone (Eq. 10) by ``evaluate.projector``, before anything else of its mode."""

    module: nn.Linear
    phases: list[Phase]  # the SGD training; none for the closed-form ridge fit
    chosen: dict[str, Any]  # what the ridge fit chose
    views_drawn: int  # augmentation steps it used: a later phase of the trial draws the views after them


def _fit_projector(setup: TrialSetup, generator: torch.Generator) -> _FittedProjector:
    """P on MSE(P(phi_e(v)), phi_d(v)) for the same augmented views (Eq. 10): trained by Adam (sgd), or solved
    in closed form (ridge, which leaves ``generator`` untouched)."""
    if setup.options.projector == "ridge":
        projector, chosen = fit_ridge_projector(setup)
        return _FittedProjector(projector, [], chosen, chosen["ridge_batches"])
    projector = _new_projector(setup, generator)

    def projection_loss(eval_features, distill_features, labels):
        if setup.anchors is None:
            return F.mse_loss(projector(eval_features), distill_features)
        # The C anchor pairs as extra rows of the batch, each weighing projector_anchors views. One matmul for views
        # and anchors: two each wrote a full D_d x D_e weight gradient (a step 9.7 vs 3.9 ms, 1280-d, one core).
        weight = setup.options.projector_anchors
        anchor_eval, anchor_distill = setup.anchors
        squared = (projector(torch.cat([eval_features, anchor_eval]))
                   - torch.cat([distill_features, anchor_distill])).pow(2)
        views = len(eval_features)
        return ((squared[:views].sum() + weight * squared[views:].sum())
                / ((views + weight * len(anchor_eval)) * distill_features.shape[1]))

    _, projector_lr = _learning_rates(setup)
    phase = optimise(setup, [{"params": projector.parameters(), "lr": projector_lr}], projection_loss,
                      nn.Sequential(projector, setup.golden), need_distill=True)
    return _FittedProjector(projector, [phase], {}, phase.steps)


def train_head(setup: TrialSetup, mode: EvaluationMode, alpha: float | None) -> TrainedModel:
    """vanilla: a linear head on cross-entropy. kd (per alpha): alpha * T^2 * KL(the golden classifier's soft
    labels on phi_d of the same view || head) + (1 - alpha) * cross-entropy."""
    generator = torch.Generator().manual_seed(setup.seed)
    head = _new_head(setup, setup.eval_backbone.feature_dim, generator, inherit=False)
    temperature = setup.options.kd_temperature

    def head_loss(eval_features, distill_features, labels):
        logits = head(eval_features)
        value = F.cross_entropy(logits, labels)
        if not mode.per_alpha:
            return value
        soft = F.softmax(setup.golden(distill_features) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
        return alpha * temperature**2 * kl + (1 - alpha) * value

    head_lr, _ = _learning_rates(setup)
    phase = optimise(setup, [{"params": head.parameters(), "lr": head_lr}], head_loss, head,
                      need_distill=mode.per_alpha)
    return TrainedModel(head, [phase])


def train_projector(setup: TrialSetup, mode: EvaluationMode, alpha: float | None) -> TrainedModel:
    """ci: only P is trained (Eq. 10); predictions are those of the frozen golden classifier on P(phi_e(x)) (Eq. 11)."""
    fitted = _fit_projector(setup, torch.Generator().manual_seed(setup.seed))
    return TrainedModel(nn.Sequential(fitted.module, setup.golden), fitted.phases, fitted.module, fitted.chosen)


def train_joint(setup: TrialSetup, mode: EvaluationMode, alpha: float | None) -> TrainedModel:
    """jt / jt_ip: P and a head trained together on MSE + cross-entropy; the head random or the golden one (IP)."""
    generator = torch.Generator().manual_seed(setup.seed)
    projector = _new_projector(setup, generator)
    head = _new_head(setup, setup.golden.in_features, generator, inherit=mode.inherits_golden_head)

    def joint_loss(eval_features, distill_features, labels):
        projected = projector(eval_features)
        return F.mse_loss(projected, distill_features) + F.cross_entropy(head(projected), labels)

    head_lr, projector_lr = _learning_rates(setup)
    groups = [{"params": projector.parameters(), "lr": projector_lr}, {"params": head.parameters(), "lr": head_lr}]
    predictor = nn.Sequential(projector, head)
    return TrainedModel(predictor, [optimise(setup, groups, joint_loss, predictor, need_distill=True)], projector)


def train_sequential(setup: TrialSetup, mode: EvaluationMode, alpha: float | None) -> TrainedModel:
    """st / st_ip: P first (Eq. 10), then, with P frozen, a head (random or the golden one) on cross-entropy."""
    generator = torch.Generator().manual_seed(setup.seed)
    fitted = _fit_projector(setup, generator)
    projector = fitted.module.requires_grad_(False)
    head = _new_head(setup, setup.golden.in_features, generator, inherit=mode.inherits_golden_head)
    predictor = nn.Sequential(projector, head)

    def sequential_loss(eval_features, distill_features, labels):
        return F.cross_entropy(head(projector(eval_features)), labels)

    head_lr, _ = _learning_rates(setup)
    second = optimise(setup, [{"params": head.parameters(), "lr": head_lr}], sequential_loss, predictor,
                       need_distill=False, step_offset=fitted.views_drawn)
    return TrainedModel(predictor, [*fitted.phases, second], projector, fitted.chosen)


class FusedPredictor(nn.Module):
    """w * log_softmax(CI logits) + (1 - w) * log_softmax(head logits): log-probabilities, so that the scales of
    a head trained on few images and of the golden classifier do not decide the mix."""

    def __init__(self, head: nn.Module, inherited: nn.Module, weight: float) -> None:
        super().__init__()
        self.head, self.inherited, self.weight = head, inherited, weight

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return ((1 - self.weight) * F.log_softmax(self.head(features), dim=1)
                + self.weight * F.log_softmax(self.inherited(features), dim=1))


def _trained(setup: TrialSetup, name: str) -> TrainedModel:
    """This trial's model of mode ``name`` (vanilla, ci): the one its own training left, or trained now."""
    if name not in setup.trained:
        mode = EVALUATION_MODES[name]
        setup.trained[name] = mode.train_function()(setup, mode, None)
    return setup.trained[name]


def train_fused(setup: TrialSetup, mode: EvaluationMode, alpha: float | None) -> TrainedModel:
    """fused: the trial's vanilla head and CI predictor (reused when trained already), their log-probabilities mixed
    with the weight of ``fusion_weights`` most accurate on the validation slice of real train features."""
    head, inherited = (_trained(setup, name) for name in mode.combines)
    weights = setup.options.fusion_weights
    candidates = [FusedPredictor(head.predictor, inherited.predictor, weight) for weight in weights]
    best, validation = _validation_choice(setup, candidates)
    parts = [*head.phases, *inherited.phases]
    plateaus = [phase.plateau for phase in parts]
    # A phase of no steps that carries the fused model's own validation accuracy (and no curve: none was trained).
    chosen_phase = Phase([], 0, None if None in plateaus else all(plateaus), validation)
    return TrainedModel(candidates[best], [*parts, chosen_phase], inherited.projector,
                        {**inherited.chosen, "fusion_weight": weights[best]})


def _trial_details(setup: TrialSetup, mode: EvaluationMode, trained: TrainedModel) -> dict[str, Any]:
    """How a trial was trained, as its record says: protocol, the learning rates that applied, steps, what a
    ridge projector chose, plateau."""
    options = setup.options
    settings = effective_settings(options, len(setup.images))
    ridge = mode.fits_projector_alone and options.projector == "ridge"
    if not mode.trains_projector or ridge:
        settings.pop("projector_lr")
    if not mode.trains_head:
        settings.pop("head_lr")
    details = {**settings, "steps": sum(phase.steps for phase in trained.phases), **trained.chosen}
    if mode.fits_projector_alone:
        details["projector_fit"] = options.projector
        details["projector_anchors"] = options.projector_anchors if setup.anchors is not None else 0.0
    if options.protocol == "authors":
        details["epochs"] = options.epochs
    if setup.view_bank is not None:
        details["view_bank"] = setup.view_bank.views
    if trained.phases and all(phase.plateau is not None for phase in trained.phases):
        details["plateau"] = all(phase.plateau for phase in trained.phases)
    if trained.phases and trained.phases[-1].validation_accuracy is not None:  # converge's check, fused's choice
        details["validation_accuracy"] = trained.phases[-1].validation_accuracy
    details["real_eval_data"] = real_data_read(setup, mode, trained)
    return details


def real_data_read(setup: TrialSetup, mode: EvaluationMode, trained: TrainedModel) -> list[str]:
    """What real labelled train data the training read through its eval backbone (evaluate.real_eval_data)."""
    options = setup.options
    ridge_validation = options.projector == "ridge" and options.ridge_choice == "validation"
    return [what for what, read in (
        ("class-mean anchors", mode.fits_projector_alone and setup.anchors is not None and setup.real_anchors),
        ("plateau check", any(phase.plateau is not None for phase in trained.phases if phase.steps)),
        ("fusion weight", bool(mode.combines)),
        ("ridge penalty", mode.fits_projector_alone and ridge_validation),
    ) if read]


def train_trial(setup: TrialSetup, recorded_mode: str) -> TrialOutcome:
    """Train one model of ``recorded_mode`` ('ci', 'kd-0.5', ...) on ``setup.images``; score its final iteration."""
    start = time.perf_counter()
    banked_before = setup.view_bank.seconds if setup.view_bank is not None else 0.0
    mode, alpha = parse_mode(recorded_mode)
    if mode is None:
        raise ValueError(f"unknown evaluation mode {recorded_mode!r}")
    trained = mode.train_function()(setup, mode, alpha)
    setup.trained[recorded_mode] = trained
    final = accuracy(trained.predictor, setup.eval_features, setup.eval_labels)
    curve = [point for phase in trained.phases[-1:] for point in phase.curve]
    details = _trial_details(setup, mode, trained)
    banked = 0.0
    if setup.view_bank is not None:
        banked = setup.view_bank.seconds - banked_before
        details["view_bank_seconds"] = banked
    return TrialOutcome(final, curve, time.perf_counter() - start - banked, trained.predictor.eval(),
                        trained.projector, details)
