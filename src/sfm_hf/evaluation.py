"""Stage III: train linear heads (or CI projectors) on a train set and score them on the eval split.

A train set is a synthetic set (``<output_dir>/synthetic/``, or another run's via
``evaluate.extra_synthetic``) or a real-image baseline (:mod:`sfm_hf.baselines`). For every
train set, evaluation backbone phi_e and mode, ``evaluate.trials`` trainings with seeds
``seed_base + k`` give a mean and a population std of the final-iteration accuracy.

Modes (paper section 3.3, Tab. 5, Fig. 3):
- ``vanilla``: a linear head on phi_e features of freshly augmented images (flip +
  random-resized-crop, every step), Adam, cosine schedule, no weight decay.
- ``ci``: classifier inheritance. The golden classifier f stays frozen; only a linear
  projector P: D_e -> D_d is trained, on MSE(P(phi_e(v)), phi_d(v)) for the same augmented
  view v through both backbones (Eq. 10); predictions are f(P(phi_e(x))) (Eq. 11).
- ``kd-<alpha>``: alpha * T^2 * KL(soft labels of f on phi_d(v) || head) + (1 - alpha) * CE.
- ``jt`` / ``jt_ip``: projector and head trained together on MSE + CE; the head starts random
  or from f's parameters (IP). ``st`` / ``st_ip``: the projector first (Eq. 10), then,
  with it frozen, the head on CE.
Reference rows: ``full_dataset`` / ``golden`` (f on phi_d, the eval features Stage I cached)
and ``full_dataset`` / ``vanilla`` (the full-data linear probe of each phi_e on cached
centre-crop train features, golden.* options).

The eval split goes through each phi_e once: its features are cached (Stage I's cache for
phi_d; ``evaluation/features/<slug>/`` otherwise), each process streaming a disjoint share
and every process then reading all shards, so each model is scored on every eval image
exactly once. Trainings are independent and deterministic for their seed, so they are
divided between processes and their results gathered; nothing depends on how many there are.
Accuracy is never used to pick anything: the curve points exist only for the plot.

Outputs: ``results.json`` (one record per train set x distill backbone x eval backbone x
mode), ``results.md``, ``evaluation/accuracy_curves.png``, ``evaluation/flow_pca.png`` and,
for this run's own synthetic set, the trial-0 CI projector of each eval backbone in
``evaluation/projectors/<slug>.safetensors`` (``weight`` [D_d, D_e], ``bias`` [D_d]).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from accelerate.logging import get_logger

from .augment import AugmentConfig, augment
from .backbones import FrozenBackbone, load_backbone
from .baselines import centroid_positions, fetch_rows, neighbor_positions, random_positions, require_row_indices
from .config import Config, EvaluateOptions
from .data import DatasetError
from . import hub
from .errors import StageInputError, UserError
from .probe import accuracy, fit_reference_probe, uniform_linear
from .progress import StageClock, StepProgress, progress as track
from .registry import DISTILL_METHODS, EVALUATION_MODES, EvaluationMode, parse_mode
from .names import short_name
from .ridge import RidgeMoments, choose_lambda, fit_ridge, lambda_grid, prior_map
from .utils import gather_lists, library_versions, save_tensors_atomically, share_from_main, write_text_atomically
from .layout import (
    CURVES_PLOT, FEATURES_DIR, FLOW_PLOT, GOLDEN_JSON, IMAGES_FILE, STATISTICS_JSON, SYNTHETIC_DIR, SYNTHETIC_JSON,
    RunLayout, projector_path,
)
from .statistics import (
    Statistics,
    load_feature_cache,
    load_golden_classifier,
    open_config_split,
    stream_features,
)

logger = get_logger(__name__)

FULL_DATASET = "full_dataset"
# LGM's evaluation views: flip + random-resized-crop, no noise.
TRAIN_AUGMENTATION = AugmentConfig(noise_p=0.0)


class EvaluationError(UserError):
    """Evaluation inputs that do not fit together; the message says what was found."""


class ProjectorMismatchError(EvaluationError):
    """A saved projector whose shape does not fit the eval backbone or the golden classifier."""


# ---------------------------------------------------------------------------------------------
# Cached features of a whole split through one backbone.


@dataclass
class FeatureSet:
    features: torch.Tensor  # float16 [N, D]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N]; row numbers, -1 for a streamed split


def _stage_one_cache_matches(config: Config, split: str, prefix: str) -> bool:
    """Whether Stage I's cache of phi_d holds ``split`` of this dataset (the eval split may have changed since)."""
    directory = RunLayout(config.output_dir).statistics_dir
    try:
        statistics = json.loads((directory / STATISTICS_JSON).read_text())
        golden = json.loads((directory / GOLDEN_JSON).read_text())
    except FileNotFoundError:
        return False
    cached_split = statistics.get("split") if prefix == "train" else golden.get("eval_split")
    same_normalization = statistics.get("normalization", "backbone") == config.data.normalization
    return statistics.get("dataset") == config.dataset and cached_split == split and same_normalization


def split_features(
    config: Config, accelerator, backbone: FrozenBackbone, split: str, prefix: str, class_names: list[str]
) -> FeatureSet:
    """Features of ``split`` through ``backbone``, computed once and cached; call it on every process.

    Every process streams a disjoint share and writes its own shards; all of them then read all
    shards, so every image counts exactly once whatever the number of processes.
    """
    if backbone.name == config.backbone and _stage_one_cache_matches(config, split, prefix):
        return FeatureSet(*load_feature_cache(RunLayout(config.output_dir).statistics_dir / FEATURES_DIR, prefix))
    cache_dir = RunLayout(config.output_dir).feature_cache(backbone.name)
    marker = cache_dir / f"{prefix}.json"
    key = {
        "backbone": backbone.name,
        "dataset": config.dataset,
        "dataset_config": config.dataset_config,
        "split": split,
        "max_samples_per_split": config.data.max_samples_per_split,
        "crop_ratio": config.data.crop_ratio,
        "normalization": config.data.normalization,
    }
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored["key"] == key:
            cached = FeatureSet(*load_feature_cache(cache_dir, prefix))
            if len(cached.labels) == stored["images"]:
                return cached
    source = open_config_split(config, split)
    if source.class_names != class_names:
        raise DatasetError(
            f"Split {split!r} has {source.num_classes} classes ({source.class_names[:5]}...), but the statistics "
            f"have {len(class_names)} ({class_names[:5]}...): evaluate on a split of the same dataset."
        )
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    feature_pass = stream_features(
        backbone, source, config.data, accelerator, cache_dir=cache_dir, prefix=prefix,
        description=f"Stage III: {split} through {short_name(backbone.name)}", progress_mode=config.progress,
    )
    if feature_pass.seen == 0:
        raise DatasetError(
            f"No usable image in split {split!r} of {config.dataset!r} ({feature_pass.skipped} skipped, e.g. "
            f"{feature_pass.skipped_examples})."
        )
    if accelerator.is_main_process:
        write_text_atomically(marker, json.dumps({"key": key, "images": feature_pass.seen}, indent=2))
    accelerator.wait_for_everyone()
    cached = FeatureSet(*load_feature_cache(cache_dir, prefix))
    if len(cached.labels) != feature_pass.seen:
        raise RuntimeError(f"{cache_dir} holds {len(cached.labels)} {prefix} rows, {feature_pass.seen} were streamed.")
    return cached


# ---------------------------------------------------------------------------------------------
# Projectors.


def save_projector(projector: nn.Linear, path: Path, *, eval_backbone: str, distill_backbone: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomically(
        {"weight": projector.weight.detach().cpu().contiguous(), "bias": projector.bias.detach().cpu().contiguous()},
        path,
        metadata={"eval_backbone": eval_backbone, "distill_backbone": distill_backbone},
    )


def load_projector(path: str | Path, *, eval_dim: int, distill_dim: int) -> nn.Linear:
    """A saved projector P: D_e -> D_d (``weight`` [D_d, D_e], ``bias`` [D_d]), checked against both dimensions."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"No projector at {path}.")
    tensors = load_file(str(path))
    weight, bias = tensors["weight"], tensors["bias"]
    source = f"trained for {load_projector_metadata(path).get('eval_backbone', 'an unknown eval backbone')}"
    if weight.shape[1] != eval_dim:
        raise ProjectorMismatchError(
            f"Projector {path} takes {weight.shape[1]}-d features ({source}), but the eval backbone gives "
            f"{eval_dim}-d features: use the projector of this eval backbone."
        )
    if weight.shape[0] != distill_dim or bias.shape != (distill_dim,):
        raise ProjectorMismatchError(
            f"Projector {path} outputs {weight.shape[0]}-d features, but the golden classifier takes {distill_dim}-d "
            "ones: it belongs to another distillation backbone."
        )
    projector = nn.Linear(eval_dim, distill_dim)
    projector.load_state_dict(tensors)
    return projector.eval()


def load_projector_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def score_projector(config: Config, accelerator, projector_path: str | Path, eval_backbone: str) -> float:
    """Accuracy of golden(P(phi_e(x))) on the eval split for a given projector; call it on every process."""
    statistics_dir = hub.statistics_dir(config)
    statistics = Statistics.load(statistics_dir)
    golden = _load_golden(statistics_dir, statistics)
    backbone = load_backbone(eval_backbone, device=accelerator.device, normalization=config.data.normalization)
    projector = load_projector(projector_path, eval_dim=backbone.feature_dim, distill_dim=golden.in_features)
    evaluation = split_features(config, accelerator, backbone, config.eval_split, "eval", statistics.class_names)
    return accuracy(nn.Sequential(projector, golden), evaluation.features, evaluation.labels)


def _load_golden(statistics_dir: Path, statistics: Statistics) -> nn.Linear:
    golden = load_golden_classifier(statistics_dir)
    if golden.in_features != statistics.feature_dim or golden.out_features != statistics.num_classes:
        raise EvaluationError(
            f"The golden classifier in {statistics_dir} is {golden.out_features}x{golden.in_features} but the "
            f"statistics are {statistics.num_classes} classes x {statistics.feature_dim}-d: re-run 'statistics'."
        )
    return golden.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Training on a set of images.


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


@dataclass
class TrialOutcome:
    accuracy: float
    curve: list[tuple[int, float]]
    seconds: float
    predictor: nn.Module  # eval features -> logits
    projector: nn.Linear | None = None
    details: dict[str, Any] = field(default_factory=dict)  # protocol, effective lrs, steps, batch, plateau


def effective_settings(options: EvaluateOptions, images: int) -> dict[str, Any]:
    """Batch and learning rates a training on ``images`` images uses under ``options.protocol``."""
    batch = min(options.batch_size, images)
    scale = batch / 256 if options.protocol == "authors" else 1.0
    return {"protocol": options.protocol, "batch_size": batch, "head_lr": options.lr * scale,
            "projector_lr": options.projector_lr * scale}


def recorded_modes(names: list[str], kd_alphas: list[float]) -> list[str]:
    """The modes as recorded: a per-alpha mode (kd) once per alpha."""
    return [variant for name in names for variant in EVALUATION_MODES[name].variants(kd_alphas)]


class ViewBank:
    """``views`` augmented views of every train image of one trial, through each backbone that asks for them.

    Computed on first use and shared by every training of the trial (its modes, plateau phases and the ridge
    solve): a trial then forwards ``views x N`` images once per backbone, where fresh views cost ``batch x steps``
    forwards per training. View ``k`` of image ``i`` is the view fresh views give image ``i`` at step ``k``; views
    at the same size are the same through every backbone, as with fresh views.
    """

    def __init__(self, images: torch.Tensor, views: int, seed: int, chunk: int, progress_mode: str = "off",
                 progress_enabled: bool = False) -> None:
        self.images, self.views, self.seed, self.chunk = images, views, seed, chunk
        self.progress_mode, self.progress_enabled = progress_mode, progress_enabled
        self._features: dict[tuple[int, int], torch.Tensor] = {}
        # Whichever training asks first pays for the forwards; kept apart so its own seconds stay comparable.
        self.seconds = 0.0

    @torch.no_grad()
    def features(self, backbone: FrozenBackbone, view_size: int) -> torch.Tensor:
        """``[views, N, D]``: view ``k`` of image ``i`` through ``backbone``."""
        key = (id(backbone), view_size)
        if key not in self._features:
            start_time = time.perf_counter()
            # Chunked so a large set is never augmented whole; index_offset keeps each image's views chunk-free.
            starts = range(0, len(self.images), self.chunk)
            per_view = []
            for view in track(range(self.views), desc=f"Stage III: view bank through {short_name(backbone.name)}",
                              unit="view", mode=self.progress_mode, enabled=self.progress_enabled, leave=False):
                parts = [backbone(augment(part, view_size, TRAIN_AUGMENTATION, seed=self.seed, step=view,
                                          index_offset=start))
                         for start, part in zip(starts, self.images.split(self.chunk))]
                per_view.append(torch.cat(parts))
            self._features[key] = torch.stack(per_view)
            self.seconds += time.perf_counter() - start_time
        return self._features[key]


class _AugmentedFeatures:
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
class _Phase:
    """One training run of a parameter group: its plot curve, length and (converge) plateau check."""

    curve: list[tuple[int, float]]
    steps: int
    plateau: bool | None = None
    validation_accuracy: float | None = None
    search_views: int | None = None  # its length was found on a bank of this many views (then trained fresh)


def _run_phase(setup: TrialSetup, groups: list[dict[str, Any]], loss: Callable, predictor: nn.Module, *,
               need_distill: bool, step_offset: int, steps: int, steps_per_decay: int, what: str = "") -> _Phase:
    """Adam for ``steps`` steps, cosine over them, the schedule stepped once every ``steps_per_decay`` steps."""
    options = setup.options
    batches = _AugmentedFeatures(setup, need_distill, step_offset)
    report = (setup.progress or _SILENT).phase(steps, what)
    # Copies: optimiser and schedule write their lr into the group dicts, and a retraining must start afresh.
    optimizer = torch.optim.Adam([dict(group) for group in groups])
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
    phase = _Phase(curve, steps)
    if options.protocol == "converge" and setup.validation_features is not None:
        phase.validation_accuracy = accuracy(predictor, setup.validation_features, setup.validation_labels)
    report.finish("" if phase.validation_accuracy is None
                  else f"validation accuracy {100 * phase.validation_accuracy:.1f}%")
    return phase


def _optimise(
    setup: TrialSetup,
    groups: list[dict[str, Any]],
    loss: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor],
    predictor: nn.Module,
    *,
    need_distill: bool,
    step_offset: int = 0,
) -> _Phase:
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


def fit_ridge_projector(setup: TrialSetup) -> tuple[nn.Linear, dict[str, Any]]:
    """The projector P: D_e -> D_d in one solve (``evaluate.projector: ridge``); returns it and what was chosen.

    The views are those the SGD projector would see (same augmentation, same view through both
    backbones). The penalty is the one with the least held-out error over ``ridge_folds`` groups
    of classes, each held out in turn: a choice made on the train images' views alone.
    """
    options = setup.options
    eval_dim, distill_dim = setup.eval_backbone.feature_dim, setup.golden.in_features
    batches = _AugmentedFeatures(setup, need_distill=True)
    folds = min(options.ridge_folds, setup.golden.out_features)
    moments = RidgeMoments.zeros(folds, eval_dim, distill_dim)
    draws = math.ceil(options.ridge_views / batches.batch)
    for step in range(draws):
        eval_features, distill_features, labels = batches(step)
        moments.add(eval_features, distill_features, labels % folds)
    prior = prior_map(eval_dim, distill_dim)
    penalty, _ = choose_lambda(moments, lambda_grid(moments, options.ridge_lambdas), prior)
    weight, bias = fit_ridge(moments, penalty, prior)
    projector = nn.Linear(eval_dim, distill_dim)
    with torch.no_grad():
        projector.weight.copy_(weight)
        projector.bias.copy_(bias)
    chosen = {"ridge_lambda": penalty, "ridge_views": draws * batches.batch, "ridge_batches": draws}
    return projector.to(setup.images.device), chosen


@dataclass
class TrainedModel:
    """What a mode's training leaves: eval features -> logits, the projector it trained, and its runs."""

    predictor: nn.Module
    phases: list[_Phase]  # none for a ridge ci: nothing is trained by gradient
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
    phases: list[_Phase]  # the SGD training; none for the closed-form ridge fit
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
        return F.mse_loss(projector(eval_features), distill_features)

    _, projector_lr = _learning_rates(setup)
    phase = _optimise(setup, [{"params": projector.parameters(), "lr": projector_lr}], projection_loss,
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
    phase = _optimise(setup, [{"params": head.parameters(), "lr": head_lr}], head_loss, head,
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
    return TrainedModel(predictor, [_optimise(setup, groups, joint_loss, predictor, need_distill=True)], projector)


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
    second = _optimise(setup, [{"params": head.parameters(), "lr": head_lr}], sequential_loss, predictor,
                       need_distill=False, step_offset=fitted.views_drawn)
    return TrainedModel(predictor, [*fitted.phases, second], projector, fitted.chosen)


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
    if options.protocol == "authors":
        details["epochs"] = options.epochs
    if setup.view_bank is not None:
        details["view_bank"] = setup.view_bank.views
    searched = [phase.search_views for phase in trained.phases if phase.search_views is not None]
    if searched:
        details["plateau_search_views"] = searched[0]
    if trained.phases and all(phase.plateau is not None for phase in trained.phases):
        details["plateau"] = all(phase.plateau for phase in trained.phases)
        details["validation_accuracy"] = trained.phases[-1].validation_accuracy
    return details


def train_trial(setup: TrialSetup, recorded_mode: str) -> TrialOutcome:
    """Train one model of ``recorded_mode`` ('ci', 'kd-0.5', ...) on ``setup.images``; score its final iteration."""
    start = time.perf_counter()
    banked_before = setup.view_bank.seconds if setup.view_bank is not None else 0.0
    mode, alpha = parse_mode(recorded_mode)
    if mode is None:
        raise ValueError(f"unknown evaluation mode {recorded_mode!r}")
    trained = mode.train_function()(setup, mode, alpha)
    final = accuracy(trained.predictor, setup.eval_features, setup.eval_labels)
    curve = [point for phase in trained.phases[-1:] for point in phase.curve]
    details = _trial_details(setup, mode, trained)
    banked = 0.0
    if setup.view_bank is not None:
        banked = setup.view_bank.seconds - banked_before
        details["view_bank_seconds"] = banked
    return TrialOutcome(final, curve, time.perf_counter() - start - banked, trained.predictor.eval(),
                        trained.projector, details)


# ---------------------------------------------------------------------------------------------
# Train sets.


@dataclass
class SyntheticSet:
    method: str
    images: torch.Tensor  # float [N, 3, R, R]
    labels: torch.Tensor
    metadata: dict[str, Any]
    folder: Path
    own: bool = False  # this run's synthetic/ (its CI projectors are saved), not one of extra_synthetic


def load_synthetic(folder: Path) -> SyntheticSet:
    """A Stage II output folder (``images.safetensors`` + ``synthetic.json``)."""
    tensors = load_file(str(folder / IMAGES_FILE))
    metadata = json.loads((folder / SYNTHETIC_JSON).read_text())
    return SyntheticSet(metadata["method"], tensors["images"].float(), tensors["labels"].long(), metadata, folder)


def _synthetic_folder(path: Path) -> Path | None:
    for folder in (path / SYNTHETIC_DIR, path):
        if (folder / IMAGES_FILE).is_file() and (folder / SYNTHETIC_JSON).is_file():
            return folder
    return None


def synthetic_sets(config: Config, class_names: list[str], own_root: Path | None = None) -> dict[str, SyntheticSet]:
    """The synthetic sets ``evaluate.train_sets`` asks for, by method: this run's (in ``own_root``, by default
    output_dir), then ``extra_synthetic``."""
    wanted = config.evaluate.synthetic_train_sets
    found: dict[str, SyntheticSet] = {}
    own = _synthetic_folder(own_root or Path(config.output_dir))
    candidates = ([own] if own is not None else []) + [Path(path) for path in config.evaluate.extra_synthetic]
    for candidate in candidates:
        folder = _synthetic_folder(candidate)
        if folder is None:
            raise EvaluationError(f"`evaluate.extra_synthetic`: {candidate} holds no synthetic/images.safetensors.")
        synthetic = load_synthetic(folder)
        synthetic.own = candidate == own
        if synthetic.method in found:
            raise EvaluationError(
                f"Two synthetic sets made by {synthetic.method!r}: {found[synthetic.method].folder} and {folder}."
            )
        if synthetic.metadata["class_names"] != class_names:
            raise EvaluationError(f"The synthetic set in {folder} has other classes than this run's statistics.")
        distilled_for = synthetic.metadata["backbone"]
        if config.backbone not in (distilled_for if isinstance(distilled_for, list) else [distilled_for]):
            raise EvaluationError(
                f"The synthetic set in {folder} was distilled with {synthetic.metadata['backbone']!r}, this run with "
                f"{config.backbone!r}: its golden classifier and baselines belong to another backbone. Evaluate it "
                "in its own run (same output_dir)."
            )
        found[synthetic.method] = synthetic
    missing = [name for name in wanted if name not in found]
    if missing:
        where = f"{config.output_dir}/synthetic" + (f" or {config.evaluate.extra_synthetic}" if candidates else "")
        hint = "run the 'distill' stage first" if own is None else f"found only {sorted(found)}"
        raise StageInputError(f"Train set(s) {missing} need synthetic images in {where}: {hint}.")
    return {name: found[name] for name in wanted}


@dataclass
class TrainSet:
    """Named images to train on; ``images_for(trial)`` differs between trials only for Random."""

    name: str
    modes: list[str]
    ipc: int
    images_for: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    details: dict[str, Any] = field(default_factory=dict)


def build_train_sets(
    config: Config,
    accelerator,
    statistics: Statistics,
    distill_backbone: FrozenBackbone,
    synthetic: dict[str, SyntheticSet],
) -> list[TrainSet]:
    """Real baselines (rows chosen on the main process in the Stage I cache) and the synthetic sets."""
    options = config.evaluate
    baseline_modes = recorded_modes(options.baseline_modes, options.kd_alphas)
    synthetic_modes = recorded_modes(options.modes, options.kd_alphas)
    resolution = (next(iter(synthetic.values())).images.shape[-1] if synthetic
                  else config.distill.resolution(distill_backbone.image_size, config.data.crop_ratio))
    wanted_baselines = [name for name in options.train_sets if name not in DISTILL_METHODS]
    rows: dict[str, Any] = {}
    if wanted_baselines:
        rows = share_from_main(
            accelerator, lambda: _baseline_rows(config, statistics, distill_backbone, synthetic, wanted_baselines)
        )
        source = open_config_split(config, config.train_split)

    @functools.lru_cache(maxsize=None)
    def fetch(row_tuple: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return fetch_rows(source, torch.tensor(row_tuple), resolution, batch_size=config.data.batch_size,
                          num_workers=config.data.num_workers)

    sets = []
    for name in options.train_sets:
        if name in synthetic:
            chosen = synthetic[name]
            sets.append(TrainSet(name, synthetic_modes, chosen.metadata["ipc"],
                                 lambda trial, chosen=chosen: (chosen.images, chosen.labels),
                                 {"synthetic_iterations": chosen.metadata["iterations"]}))
        elif name == "random":
            per_trial = rows["random"]
            sets.append(TrainSet(name, baseline_modes, config.ipc,
                                 lambda trial, per_trial=per_trial: fetch(tuple(per_trial[trial]))))
        elif name == "centroids":
            sets.append(TrainSet(name, baseline_modes, config.ipc, lambda trial: fetch(tuple(rows["centroids"])),
                                 {"rows": rows["centroids"]}))
        elif name == "neighbors":
            for method in synthetic:
                chosen_rows = rows[f"neighbors_{method}"]
                sets.append(TrainSet(f"neighbors_{method}", baseline_modes, synthetic[method].metadata["ipc"],
                                     lambda trial, chosen_rows=chosen_rows: fetch(tuple(chosen_rows)),
                                     {"neighbors_of": method, "rows": chosen_rows}))
    return sets


def _baseline_rows(
    config: Config,
    statistics: Statistics,
    distill_backbone: FrozenBackbone,
    synthetic: dict[str, SyntheticSet],
    wanted: list[str],
) -> dict[str, Any]:
    """Row numbers of the chosen real train images: per trial for random, once for the others."""
    train = load_feature_cache(RunLayout(config.output_dir).statistics_dir / FEATURES_DIR, "train")
    features, labels, indices = train
    require_row_indices(indices, config.train_split)
    options = config.evaluate
    rows: dict[str, Any] = {}
    if "random" in wanted:
        rows["random"] = [
            indices[random_positions(labels, statistics.num_classes, config.ipc, options.seed_base + trial)].tolist()
            for trial in range(options.trials)
        ]
    if "centroids" in wanted:
        rows["centroids"] = indices[centroid_positions(features, labels, statistics.class_means, config.ipc)].tolist()
    if "neighbors" in wanted:
        for method, chosen in synthetic.items():
            synthetic_features = _features_of(distill_backbone, chosen.images)
            positions = neighbor_positions(features, labels, synthetic_features, chosen.labels)
            rows[f"neighbors_{method}"] = indices[positions].tolist()
    return rows


@torch.no_grad()
def _features_of(backbone: FrozenBackbone, images: torch.Tensor) -> torch.Tensor:
    """Un-augmented features of whole images (the backbone resizes them), on the CPU."""
    device = next(backbone.buffers()).device
    return torch.cat([backbone(chunk.to(device)).cpu() for chunk in images.split(256)])


# ---------------------------------------------------------------------------------------------
# The stage.


@dataclass(frozen=True)
class Job:
    train_set: str
    eval_backbone: str
    mode: str
    trial: int


@dataclass
class JobResult:
    job: Job
    accuracy: float
    curve: list[tuple[int, float]]
    seconds: float
    images: int
    details: dict[str, Any] = field(default_factory=dict)  # how it was trained: protocol, lrs, steps, batch


def _population_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


@dataclass
class EvalBackbone:
    name: str
    backbone: FrozenBackbone
    evaluation: FeatureSet
    train: FeatureSet | None  # for the full-dataset probe and the plateau check

    def validation_slice(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random subset of ``count`` cached real train rows (all of them if fewer)."""
        order = torch.randperm(len(self.train.labels), generator=torch.Generator().manual_seed(seed))[:count]
        order = torch.sort(order).values
        return self.train.features[order].float(), self.train.labels[order]


def _eval_backbones(
    config: Config, accelerator, distill_backbone: FrozenBackbone, class_names: list[str]
) -> dict[str, EvalBackbone]:
    """Each eval backbone with its cached eval features (and train features for the full-dataset probe)."""
    backbones = {}
    for name in config.evaluation_backbones:
        backbone = distill_backbone if name == config.backbone else load_backbone(
            name, device=accelerator.device, normalization=config.data.normalization)
        evaluation = split_features(config, accelerator, backbone, config.eval_split, "eval", class_names)
        train = None
        if config.evaluate.full_dataset or config.evaluate.protocol == "converge":
            train = split_features(config, accelerator, backbone, config.train_split, "train", class_names)
        backbones[name] = EvalBackbone(name, backbone, evaluation, train)
    return backbones


@dataclass
class EvaluationInputs:
    """What every training of Stage III reads, loaded once."""

    statistics: Statistics
    golden: nn.Linear  # frozen, on the device
    distill_backbone: FrozenBackbone
    synthetic: dict[str, SyntheticSet]
    train_sets: list[TrainSet]
    backbones: dict[str, EvalBackbone]
    distill_evaluation: FeatureSet  # phi_d features of the eval split (the golden classifier's row)

    @property
    def own_method(self) -> str | None:
        """The method of this run's own synthetic set (whose CI projectors are saved), if it is evaluated."""
        return next((name for name, chosen in self.synthetic.items() if chosen.own), None)


def load_inputs(config: Config, accelerator, synthetic_root: Path | None = None) -> EvaluationInputs:
    """Statistics, golden classifier, backbones, train sets and cached eval features; call it on every process.

    ``synthetic_root``: the run folder whose ``synthetic/`` is this run's own set (default output_dir; a
    member of a joint run evaluates the joint set).
    """
    statistics_dir = hub.statistics_dir(config)
    if config.eval_split == config.train_split:
        raise EvaluationError(
            f"eval_split and train_split are both {config.train_split!r}: accuracy on the images the golden "
            "classifier and the baselines were drawn from says nothing. Give a held-out split as eval_split."
        )
    statistics = Statistics.load(statistics_dir)
    golden = _load_golden(statistics_dir, statistics)
    distill_backbone = load_backbone(config.backbone, device=accelerator.device,
                                     normalization=config.data.normalization)
    if distill_backbone.feature_dim != statistics.feature_dim:
        raise EvaluationError(
            f"Backbone {config.backbone!r} gives {distill_backbone.feature_dim}-d features but the statistics in "
            f"{statistics_dir} are {statistics.feature_dim}-d: they come from another backbone."
        )
    golden = golden.to(accelerator.device)
    synthetic = synthetic_sets(config, statistics.class_names, synthetic_root)
    train_sets = build_train_sets(config, accelerator, statistics, distill_backbone, synthetic)
    backbones = _eval_backbones(config, accelerator, distill_backbone, statistics.class_names)
    if config.backbone in backbones:
        distill_evaluation = backbones[config.backbone].evaluation
    else:
        distill_evaluation = split_features(
            config, accelerator, distill_backbone, config.eval_split, "eval", statistics.class_names
        )
    return EvaluationInputs(statistics, golden, distill_backbone, synthetic, train_sets, backbones, distill_evaluation)


def plan_jobs(config: Config, inputs: EvaluationInputs) -> list[Job]:
    """Every training: train set x trial x eval backbone x mode, then the full-dataset probes."""
    options = config.evaluate
    # A trial's trainings next to each other: with evaluate.view_bank they share the trial's views.
    jobs = [
        Job(train_set.name, name, mode, trial)
        for train_set in inputs.train_sets
        for trial in range(options.trials)
        for name in inputs.backbones
        for mode in train_set.modes
    ]
    if options.full_dataset:
        # The converged fit is deterministic (no seed enters it): one fit says all that trials would.
        full_trials = options.trials if config.golden.recipe == "authors" else 1
        jobs += [Job(FULL_DATASET, name, "vanilla", trial) for name in inputs.backbones for trial in range(full_trials)]
    return jobs


class _OnDevice:
    """Each eval backbone's eval features (and, under converge, its validation slice), moved to the device once."""

    def __init__(self, options: EvaluateOptions, device) -> None:
        self.options, self.device = options, device
        self.evaluation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.validation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def eval_split(self, model: EvalBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        if model.name not in self.evaluation:
            self.evaluation[model.name] = (model.evaluation.features.to(self.device).float(),
                                           model.evaluation.labels.to(self.device))
        return self.evaluation[model.name]

    def validation_slice(self, model: EvalBackbone) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.options.protocol != "converge":
            return None, None
        if model.name not in self.validation:
            features, labels = model.validation_slice(self.options.validation_images, self.options.seed_base)
            self.validation[model.name] = (features.to(self.device), labels.to(self.device))
        return self.validation[model.name]


@dataclass
class _TrialBanks:
    views: ViewBank | None  # evaluate.view_bank: every training draws from it
    search: ViewBank | None  # fresh views under converge: the plateau search's bank


def bank_views(wanted: int, images: int, feature_widths: int, max_mib: float) -> int:
    """How many of ``wanted`` views of ``images`` images fit ``max_mib`` as float32 features of ``feature_widths``
    summed widths (one per backbone the bank serves)."""
    per_view = images * feature_widths * 4
    return min(wanted, int(max_mib * (1 << 20) // per_view))


def trial_banks(options: EvaluateOptions, images: torch.Tensor, seed: int, feature_widths: int, *,
                progress_mode: str, shown: bool, announce: bool, train_set: str) -> _TrialBanks:
    """The view bank of one trial (``evaluate.view_bank``) or, with fresh views under converge, the bank its plateau
    searches run on, each cut to what fits ``evaluate.view_bank_max_mib``; ``announce`` logs a cut."""
    searching = options.view_bank == 0 and options.protocol == "converge"
    wanted = options.view_bank or (options.plateau_search_views if searching else 0)
    if not wanted:
        return _TrialBanks(None, None)
    views = bank_views(wanted, len(images), feature_widths, options.view_bank_max_mib)
    if views < wanted and announce:
        key = "evaluate.view_bank" if options.view_bank else "evaluate.plateau_search_views"
        outcome = (f"using {views} views per image" if views else
                   "using fresh views every step" if options.view_bank else "searching with fresh views")
        logger.info(f"Stage III: {train_set}: {wanted} views of {len(images)} images through backbones of "
                    f"{feature_widths} summed features exceed evaluate.view_bank_max_mib="
                    f"{options.view_bank_max_mib:g}: {outcome} ({key}).")
    if not views:
        return _TrialBanks(None, None)
    bank = ViewBank(images, views, seed, options.batch_size, progress_mode, shown)
    return _TrialBanks(bank, None) if options.view_bank else _TrialBanks(None, bank)


def run_jobs(config: Config, accelerator, inputs: EvaluationInputs, jobs: list[Job]) -> list[JobResult]:
    """This process's share of ``jobs`` (every world_size-th); saves this run's trial-0 CI projectors."""
    options, device = config.evaluate, accelerator.device
    sets_by_name = {train_set.name: train_set for train_set in inputs.train_sets}
    on_device = _OnDevice(options, device)
    mine = []
    bank_of: tuple[str, int] | None = None
    shown = accelerator.is_local_main_process
    share = jobs[accelerator.process_index::accelerator.num_processes]
    clock = StageClock(len(share))
    progress = track(share, desc="Stage III", unit="model", mode=config.progress, enabled=shown)
    served = [inputs.distill_backbone, *(model.backbone for model in inputs.backbones.values())]
    bank_widths = sum({id(backbone): backbone.feature_dim for backbone in served}.values())
    for job in progress:
        label = f"{job.train_set} {job.mode} -> {short_name(job.eval_backbone)} #{job.trial}"
        progress.set_postfix_str(label)
        model = inputs.backbones[job.eval_backbone]
        eval_features, eval_labels = on_device.eval_split(model)
        validation = on_device.validation_slice(model)
        seed = options.seed_base + job.trial
        if job.train_set == FULL_DATASET:
            # converged: the golden classifier's seed, so on phi_d this row is the golden classifier refitted.
            probe_seed = seed if config.golden.recipe == "authors" else config.seed
            mine.append(_full_dataset_trial(config, job, model, inputs.statistics.num_classes, eval_features,
                                            eval_labels, probe_seed, device))
            clock.finish_unit()
            continue
        images, labels = sets_by_name[job.train_set].images_for(job.trial)
        images = images.to(device)
        if bank_of != (job.train_set, job.trial):
            bank_of, banks = (job.train_set, job.trial), trial_banks(
                options, images, seed, bank_widths, progress_mode=config.progress, shown=shown,
                announce=shown and job.trial == 0, train_set=job.train_set)
        setup = TrialSetup(images, labels.to(device), model.backbone, inputs.distill_backbone,
                           inputs.golden, eval_features, eval_labels, options, seed, *validation,
                           view_bank=banks.views, search_bank=banks.search,
                           progress=TrainingProgress(clock, label, config.progress, shown))
        outcome = train_trial(setup, job.mode)
        clock.finish_unit()
        if job.train_set == inputs.own_method and job.mode == "ci" and job.trial == 0:
            save_projector(outcome.projector, RunLayout(config.output_dir).projector(job.eval_backbone),
                           eval_backbone=job.eval_backbone, distill_backbone=config.backbone)
        mine.append(JobResult(job, outcome.accuracy, outcome.curve, outcome.seconds, len(images), outcome.details))
    return mine


def run_evaluate(config: Config, accelerator, synthetic_root: Path | None = None) -> list[dict[str, Any]]:
    """Stage III; writes ``results.json``, ``results.md``, plots and projectors; returns the records.

    ``synthetic_root``: see :func:`load_inputs`. A joint run (a list of backbones) is evaluated on
    every member by :mod:`sfm_hf.multi`.
    """
    inputs = load_inputs(config, accelerator, synthetic_root)
    jobs = plan_jobs(config, inputs)
    start = time.perf_counter()
    results = gather_lists(accelerator, run_jobs(config, accelerator, inputs, jobs))
    seconds = time.perf_counter() - start
    records: list[dict[str, Any]] = []
    if accelerator.is_main_process:
        records = _records(config, inputs.train_sets, inputs.backbones, inputs.golden, inputs.distill_evaluation,
                           results, int(inputs.statistics.class_counts.sum()), inputs.own_method)
        _write_outputs(config, records, inputs.statistics, inputs.distill_backbone, inputs.synthetic)
        _print_summary(config, records, len(jobs), seconds, accelerator.num_processes)
        accelerator.log({
            "evaluate/" + "/".join(short_name(str(record[key])) for key in ("train_set", "mode", "eval_backbone")
                                   if record.get(key) is not None): record["mean"]
            for record in records if record.get("mean") is not None
        })
    accelerator.wait_for_everyone()
    return records


def _full_dataset_trial(config: Config, job: Job, model: EvalBackbone, num_classes: int, eval_features: torch.Tensor,
                        eval_labels: torch.Tensor, seed: int, device) -> JobResult:
    """The full-dataset probe of one eval backbone: the golden classifier's recipe on its cached train features."""
    start = time.perf_counter()
    train = model.train
    head, fitted = fit_reference_probe(config.golden, train.features, train.labels, num_classes, seed=seed,
                                       device=device)
    score = accuracy(head.to(device), eval_features, eval_labels)
    return JobResult(job, score, [], time.perf_counter() - start, len(train.labels), fitted)


def _mean_curve(results: list[JobResult]) -> dict[str, list[float]] | None:
    """Trial-mean accuracy at each recorded iteration, over the trials as long as the longest (converge can differ)."""
    curves = [result.curve for result in results if result.curve]
    if not curves:
        return None
    longest = max(curves, key=lambda curve: curve[-1][0])
    iterations = [step for step, _ in longest]
    same = [curve for curve in curves if [step for step, _ in curve] == iterations]
    means = [sum(curve[k][1] for curve in same) / len(same) for k in range(len(iterations))]
    return {"iterations": iterations, "mean": means, "trials": len(same)}


def _summary(values: list[float]) -> dict[str, Any]:
    return {"mean": sum(values) / len(values), "std": _population_std(values), "per_trial": values,
            "trials": len(values)}


def _records(
    config: Config,
    train_sets: list[TrainSet],
    backbones: dict[str, EvalBackbone],
    golden: nn.Linear,
    distill_evaluation: FeatureSet,
    results: list[JobResult],
    golden_train_images: int,
    own_method: str | None,
) -> list[dict[str, Any]]:
    """One record per (train set, distill backbone, eval backbone, mode), trials in seed order, then the references."""
    grouped: dict[tuple[str, str, str], list[JobResult]] = {}
    for result in sorted(results, key=lambda result: result.job.trial):
        job = result.job
        grouped.setdefault((job.train_set, job.eval_backbone, job.mode), []).append(result)
    records = []
    for train_set in train_sets:
        for name, model in backbones.items():
            for mode in train_set.modes:
                record = _trial_record(config, train_set, model, mode, grouped[(train_set.name, name, mode)])
                if train_set.name == own_method and mode == "ci":
                    record.update(_saved_projector_score(config, model, golden))
                records.append(record)
    records.append(_golden_record(config, golden, distill_evaluation, golden_train_images))
    if config.evaluate.full_dataset:
        records.extend(_full_dataset_record(config, name, grouped[(FULL_DATASET, name, "vanilla")])
                       for name in backbones)
    return records


def _trial_record(config: Config, train_set: TrainSet, model: EvalBackbone, mode: str,
                  trials: list[JobResult]) -> dict[str, Any]:
    """The record of one (train set, eval backbone, mode): accuracy over trials and how they were trained."""
    options = config.evaluate
    entry, alpha = parse_mode(mode)
    steps = [trial.details["steps"] for trial in trials]
    record = {
        "train_set": train_set.name,
        "distill_backbone": config.backbone,
        "eval_backbone": model.name,
        "mode": mode,
        **_summary([trial.accuracy for trial in trials]),
        "ipc": train_set.ipc,
        "iterations": max(steps),
        "steps_per_trial": steps,
        "seconds": round(sum(trial.seconds for trial in trials), 3),
        "images": trials[0].images,
        "seeds": [options.seed_base + trial.job.trial for trial in trials],
        **{key: value for key, value in trials[0].details.items()
           if key not in ("steps", "plateau", "validation_accuracy", "ridge_lambda", "view_bank_seconds")},
    }
    if "view_bank_seconds" in trials[0].details:
        record["view_bank_seconds"] = round(sum(trial.details["view_bank_seconds"] for trial in trials), 3)
    if "ridge_lambda" in trials[0].details:
        record["ridge_lambda"] = [trial.details["ridge_lambda"] for trial in trials]
    if "plateau" in trials[0].details:
        record["plateau_reached"] = all(trial.details["plateau"] for trial in trials)
        record["validation_accuracy"] = sum(trial.details["validation_accuracy"] for trial in trials) / len(trials)
        record["validation_images"] = min(options.validation_images, len(model.train.labels))
    if entry.per_alpha:
        record.update(alpha=alpha, temperature=options.kd_temperature)
    record.update(train_set.details)
    curve = _mean_curve(trials)
    if curve is not None:
        record["curve"] = curve
    return record


def _saved_projector_score(config: Config, model: EvalBackbone, golden: nn.Linear) -> dict[str, Any]:
    """Where this run's trial-0 CI projector of ``model`` was saved, and golden(P(phi_e(x)))'s accuracy read back
    from that file: what the exported bundle will hold and its card will claim."""
    relative = projector_path(model.name)
    device = golden.weight.device
    projector = load_projector(Path(config.output_dir) / relative, eval_dim=model.backbone.feature_dim,
                               distill_dim=golden.in_features).to(device)
    score = accuracy(nn.Sequential(projector, golden), model.evaluation.features.to(device),
                     model.evaluation.labels.to(device))
    return {"projector": relative, "projector_accuracy": score}


def _golden_record(config: Config, golden: nn.Linear, distill_evaluation: FeatureSet,
                   golden_train_images: int) -> dict[str, Any]:
    """The golden classifier of Stage I scored on phi_d features of the eval split."""
    start = time.perf_counter()
    device = golden.weight.device
    golden_accuracy = accuracy(golden, distill_evaluation.features.to(device), distill_evaluation.labels.to(device))
    golden_file = hub.statistics_dir(config) / GOLDEN_JSON
    fitted = json.loads(golden_file.read_text()) if golden_file.is_file() else {}
    return {
        "train_set": FULL_DATASET, "distill_backbone": config.backbone, "eval_backbone": config.backbone,
        "mode": "golden", **_summary([golden_accuracy]), "ipc": None,
        "seconds": round(time.perf_counter() - start, 3), "images": int(golden_train_images),
        "protocol": f"golden:{fitted.get('recipe', 'unknown')}", "iterations": fitted.get("steps"),
        **{key: value for key, value in fitted.items() if key not in ("eval_accuracy", "eval_split", "eval_images")},
        "note": "the golden classifier of Stage I on phi_d features of the eval split",
    }


def _full_dataset_record(config: Config, eval_backbone: str, trials: list[JobResult]) -> dict[str, Any]:
    """The full-dataset linear probe of one eval backbone."""
    return {
        "train_set": FULL_DATASET, "distill_backbone": config.backbone, "eval_backbone": eval_backbone,
        "mode": "vanilla", **_summary([trial.accuracy for trial in trials]), "ipc": None,
        "seconds": round(sum(trial.seconds for trial in trials), 3), "images": trials[0].images,
        "protocol": f"golden:{config.golden.recipe}", "iterations": trials[0].details["steps"],
        **trials[0].details,
        "note": "linear probe on cached centre-crop features of the whole train split (golden.* options)",
    }


def _write_outputs(
    config: Config,
    records: list[dict[str, Any]],
    statistics: Statistics,
    distill_backbone: FrozenBackbone,
    synthetic: dict[str, SyntheticSet],
) -> None:
    from .report import plot_accuracy_curves, plot_flow_pca, write_markdown

    layout = RunLayout(config.output_dir)
    folder = layout.evaluation_dir
    folder.mkdir(parents=True, exist_ok=True)
    # Each record names its environment, so a row copied into a merged table (report.py) still does.
    versions = library_versions()
    for record in records:
        record["versions"] = versions
    write_text_atomically(layout.results_file, json.dumps(records, indent=2))
    for stale in (CURVES_PLOT, FLOW_PLOT):
        (folder / stale).unlink(missing_ok=True)
    plot_accuracy_curves(records, folder / CURVES_PLOT)
    if synthetic:
        flows = {method: (_features_of(distill_backbone, chosen.images), chosen.labels)
                 for method, chosen in synthetic.items()}
        plot_flow_pca(statistics.class_means, statistics.class_counts, flows, statistics.class_names,
                      folder / FLOW_PLOT, non_target=config.statistics.non_target)
    write_markdown(records, layout.results_markdown, title=f"Results: {short_name(config.dataset)}, ipc {config.ipc}")


def _print_summary(config: Config, records: list[dict[str, Any]], trainings: int, seconds: float,
                   world_size: int) -> None:
    from .report import paper_tables

    options = config.evaluate
    reference = EvaluateOptions()
    length = (f"{options.epochs} epochs each" if options.protocol == "authors"
              else f"{options.iterations} steps or more each, until the validation accuracy plateaus")
    logger.info(
        f"Stage III ({options.protocol} protocol): {trainings} trainings ({options.trials} trial(s), {length}) on "
        f"{world_size} process(es) in {seconds:.1f} s. -> {RunLayout(config.output_dir).results_file}"
    )
    unfinished = [f"{record['train_set']}/{record['mode']}" for record in records
                  if record.get("plateau_reached") is False]
    if unfinished:
        logger.warning(f"no plateau within evaluate.max_iterations={options.max_iterations} for {unfinished}: "
              "raise it or the learning rates.")
    if options.trials < reference.trials:
        logger.info(f"Note: fewer trials than the paper's protocol ({reference.trials}), so means and stds are rougher.")
    logger.info(paper_tables(records))
