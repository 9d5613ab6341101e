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
- ``fused``: w * log_softmax(CI) + (1 - w) * log_softmax(vanilla head), w of ``evaluate.fusion_weights`` chosen on
  the validation slice of real train features (needs ``evaluate.real_eval_data``); the trial's vanilla and ci
  models are reused.
The projector fits of ci / st / st_ip / fused add one class-mean anchor pair per class
(``evaluate.projector_anchors``): on the distillation backbone phi_d's class mean from Stage I on both sides (the
published statistics); on another eval backbone, only with ``evaluate.real_eval_data``, phi_e's mean real train
feature -> that class mean.

What a training on a synthetic or baseline set reads: its images (through every eval backbone) and the published
Stage I outputs (statistics, golden classifier). Whatever reads real labelled train data through an eval backbone
(the anchors above, protocol converge's plateau check, fused's weight, ``ridge_choice: validation``) needs
``evaluate.real_eval_data``, and the record lists it in ``real_eval_data`` (report.py labels the row). A ci / fused
record on the distillation backbone itself says ``same_network``: its projector's optimum is the identity whatever
the images, so it returns about the golden classifier.
Reference rows: ``full_dataset`` / ``golden`` (f on phi_d, the eval features Stage I cached)
and ``full_dataset`` / ``vanilla`` (the full-data linear probe of each phi_e on cached
centre-crop train features, golden.* options): they train on the whole real train split by definition.

The eval split goes through each phi_e once: its features are cached (Stage I's cache for
phi_d; ``evaluation/features/<slug>/`` otherwise), each process streaming a disjoint share
and every process then reading all shards, so each model is scored on every eval image
exactly once. Trainings are independent and deterministic for their seed, so they are
divided between processes and their results gathered; nothing depends on how many there are.
Accuracy is never used to pick anything: the curve points exist only for the plot.

Outputs: ``results.json`` (one record per train set x distill backbone x eval backbone x
mode), ``results.md``, ``evaluation/accuracy_curves.png``, ``evaluation/flow_pca.png`` and,
for this run's own synthetic set, the trial-0 CI projector of each eval backbone in
``evaluation/projectors/<slug>.safetensors`` (``weight`` [D_d, D_e], ``bias`` [D_d]); with
``evaluate.time_to_quality``, ``evaluation/time_to_quality.{json,md,png}`` (``time_to_quality``).

Modules, in the order a run uses them: ``features`` (cached split features, Stage I's cache reused),
``train_sets`` (synthetic sets and real-image baselines), ``views`` (view banks and their memory cap),
``training`` (a training's setup, batches, cosine cycles and protocols), ``trainers`` (one training function per mode,
the ridge fit, a scored trial), ``projectors`` (saved projector files, the golden classifier), ``records``
(results.json, tables, plots, summary), ``time_to_quality`` (the snapshots' train sets and curves), ``errors``; this
module runs the stage (load inputs, plan and run the trainings, write).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import FrozenBackbone, load_backbone
from ..config import Config, EvaluateOptions
from .. import hub
from ..probe import accuracy, fit_reference_probe
from ..progress import StageClock, progress as track
from ..registry import parse_mode
from ..names import short_name
from ..utils import gather_lists
from ..layout import RunLayout
from ..statistics import Statistics
from .errors import EvaluationError, ProjectorMismatchError
from .features import FeatureSet, split_features, EvalBackbone
from .projectors import save_projector, load_golden, load_projector, score_projector
from .views import training_augmentation, trial_bank
from .training import TrialSetup, TrainingProgress
from .trainers import train_trial
from .train_sets import SyntheticSet, load_synthetic, synthetic_sets, TrainSet, build_train_sets
from .records import FULL_DATASET, Job, JobResult, build_records, write_outputs, print_summary
from .time_to_quality import snapshot_sources, write_curves

# The names callers outside the stage use (tests, benchmarks, re-scoring a saved projector).
__all__ = ["EvaluationError", "ProjectorMismatchError", "TrialSetup", "load_projector", "load_synthetic",
           "run_evaluate", "save_projector", "score_projector", "train_trial"]


def _uses_anchors(options: EvaluateOptions) -> bool:
    """Whether a projector fit adds class-mean anchors (on the distillation backbone from the statistics; on another
    eval backbone from its cached train features, with real_eval_data)."""
    return options.projector_anchors > 0 and any(
        parse_mode(mode)[0].fits_projector_alone for mode in options.modes + options.baseline_modes)


def _reads_train_features(config: Config, name: str) -> bool:
    """Whether Stage III needs the cached real train features of eval backbone ``name``: for the full-dataset probe
    (a reference row), or for what evaluate.real_eval_data allows (plateau check, fused, ridge validation, anchors on
    an eval backbone other than the distillation one)."""
    options = config.evaluate
    real = options.real_eval_data and bool(
        options.reads_real_train_features or (_uses_anchors(options) and name != config.backbone))
    return options.full_dataset or real


def _eval_backbones(
    config: Config, accelerator, distill_backbone: FrozenBackbone, class_names: list[str]
) -> dict[str, EvalBackbone]:
    """Each eval backbone with its cached eval features (and train features when :func:`_reads_train_features`)."""
    backbones = {}
    for name in config.evaluation_backbones:
        backbone = distill_backbone if name == config.backbone else load_backbone(
            name, device=accelerator.device, normalization=config.data.normalization)
        evaluation = split_features(config, accelerator, backbone, config.eval_split, "eval", class_names)
        train = None
        if _reads_train_features(config, name):
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
    golden = load_golden(statistics_dir, statistics)
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
        # A mode that combines others (fused) after them, so that it reuses their trained models.
        for mode in sorted(train_set.modes, key=lambda mode: bool(parse_mode(mode)[0].combines))
    ]
    if options.full_dataset:
        # The converged fit is deterministic (no seed enters it): one fit says all that trials would.
        full_trials = options.trials if config.golden.recipe == "authors" else 1
        jobs += [Job(FULL_DATASET, name, "vanilla", trial) for name in inputs.backbones for trial in range(full_trials)]
    return jobs


class _OnDevice:
    """Each eval backbone's eval features (and, with real_eval_data, its validation slice), and its class-mean anchor
    pairs, moved to the device once."""

    def __init__(self, options: EvaluateOptions, device, statistics: Statistics, distill_backbone: str) -> None:
        self.options, self.device, self.statistics = options, device, statistics
        self.distill_backbone = distill_backbone
        self.evaluation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.validation: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.anchor_pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def real_anchors(self, model: EvalBackbone) -> bool:
        """Whether ``model``'s anchors are read from real train features through it (not from the statistics)."""
        return model.name != self.distill_backbone and self.anchors(model) is not None

    def anchors(self, model: EvalBackbone) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per class, phi_e's mean feature -> phi_d's class mean from Stage I. On the distillation backbone phi_e's
        mean is that class mean itself (the published statistics); elsewhere, with real_eval_data, phi_e's mean over
        the real TRAIN images (the same images); otherwise none."""
        if not _uses_anchors(self.options):
            return None
        if model.name not in self.anchor_pairs:
            means = self.statistics.class_means.float().to(self.device)
            pairs = None
            if model.name == self.distill_backbone:
                pairs = (means, means)
            elif self.options.real_eval_data:
                pairs = (self._train_means(model).to(self.device), means)
            self.anchor_pairs[model.name] = pairs
        return self.anchor_pairs[model.name]

    def _train_means(self, model: EvalBackbone) -> torch.Tensor:
        classes = self.statistics.num_classes
        counts = torch.bincount(model.train.labels, minlength=classes)
        if bool((counts == 0).any()):
            raise EvaluationError(
                f"The cached train features of {model.name!r} lack class {int((counts == 0).nonzero()[0])}, so "
                "it has no class-mean anchor: set `evaluate.projector_anchors: 0`, or check the train split."
            )
        sums = torch.zeros(classes, model.train.features.shape[1]).index_add_(
            0, model.train.labels, model.train.features.float())
        return sums / counts.unsqueeze(1)

    def eval_split(self, model: EvalBackbone) -> tuple[torch.Tensor, torch.Tensor]:
        if model.name not in self.evaluation:
            self.evaluation[model.name] = (model.evaluation.features.to(self.device).float(),
                                           model.evaluation.labels.to(self.device))
        return self.evaluation[model.name]

    def validation_slice(self, model: EvalBackbone) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not (self.options.real_eval_data and self.options.reads_real_train_features):
            return None, None
        if model.name not in self.validation:
            features, labels = model.validation_slice(self.options.validation_images, self.options.seed_base)
            self.validation[model.name] = (features.to(self.device), labels.to(self.device))
        return self.validation[model.name]


def run_jobs(config: Config, accelerator, inputs: EvaluationInputs, jobs: list[Job]) -> list[JobResult]:
    """This process's share of ``jobs`` (every world_size-th); saves this run's trial-0 CI projectors."""
    options, device = config.evaluate, accelerator.device
    sets_by_name = {train_set.name: train_set for train_set in inputs.train_sets}
    on_device = _OnDevice(options, device, inputs.statistics, config.backbone)
    trained_of, trained = None, {}
    mine = []
    bank_of: tuple[str, int] | None = None
    shown = accelerator.is_local_main_process
    share = jobs[accelerator.process_index::accelerator.num_processes]
    clock = StageClock(len(share))
    progress = track(share, desc="Stage III", unit="model", mode=config.progress, enabled=shown)
    served = [inputs.distill_backbone, *(model.backbone for model in inputs.backbones.values())]
    bank_widths = sum({id(backbone): backbone.feature_dim for backbone in served}.values())
    augmentation = training_augmentation(config.augment)
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
            bank_of, bank = (job.train_set, job.trial), trial_bank(
                options, images, seed, bank_widths, progress_mode=config.progress, shown=shown,
                announce=shown and job.trial == 0, train_set=job.train_set, augmentation=augmentation)
        if trained_of != (job.train_set, job.trial, job.eval_backbone):
            trained_of, trained = (job.train_set, job.trial, job.eval_backbone), {}
        setup = TrialSetup(images, labels.to(device), model.backbone, inputs.distill_backbone,
                           inputs.golden, eval_features, eval_labels, options, seed, *validation,
                           view_bank=bank,
                           progress=TrainingProgress(clock, label, config.progress, shown),
                           anchors=on_device.anchors(model), real_anchors=on_device.real_anchors(model),
                           trained=trained, augmentation=augmentation)
        outcome = train_trial(setup, job.mode)
        clock.finish_unit()
        if job.train_set == inputs.own_method and parse_mode(job.mode)[0].bundles_projector and job.trial == 0:
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
        records = build_records(config, inputs.train_sets, inputs.backbones, inputs.golden, inputs.distill_evaluation,
                           results, int(inputs.statistics.class_counts.sum()), inputs.own_method)
        write_outputs(config, records, inputs.statistics, inputs.distill_backbone, inputs.synthetic)
        print_summary(config, records, len(jobs), seconds, accelerator.num_processes)
        accelerator.log({
            "evaluate/" + "/".join(short_name(str(record[key])) for key in ("train_set", "mode", "eval_backbone")
                                   if record.get(key) is not None): record["mean"]
            for record in records if record.get("mean") is not None
        })
    if config.evaluate.time_to_quality:
        score_snapshots(config, accelerator, inputs, records)
    accelerator.wait_for_everyone()
    return records


def score_snapshots(config: Config, accelerator, inputs: EvaluationInputs, records: list[dict[str, Any]]) -> None:
    """evaluate.time_to_quality: every snapshot of each evaluated synthetic set, trained and scored by the final
    set's jobs (the full-dataset probes left out: they do not depend on the set); call it on every process."""
    sources = snapshot_sources(inputs.train_sets, inputs.synthetic, announce=accelerator.is_main_process)
    if not sources:
        return
    scoring = replace(config, evaluate=replace(config.evaluate, full_dataset=False))
    snapshots = replace(inputs, train_sets=[train_set for source in sources for train_set in source.snapshot_sets()])
    start = time.perf_counter()
    results = gather_lists(accelerator, run_jobs(scoring, accelerator, snapshots, plan_jobs(scoring, snapshots)))
    if accelerator.is_main_process:
        write_curves(config, sources, list(inputs.backbones), results, records, time.perf_counter() - start)


def _full_dataset_trial(config: Config, job: Job, model: EvalBackbone, num_classes: int, eval_features: torch.Tensor,
                        eval_labels: torch.Tensor, seed: int, device) -> JobResult:
    """The full-dataset probe of one eval backbone: the golden classifier's recipe on its cached train features."""
    start = time.perf_counter()
    train = model.train
    head, fitted = fit_reference_probe(config.golden, train.features, train.labels, num_classes, seed=seed,
                                       device=device)
    score = accuracy(head.to(device), eval_features, eval_labels)
    return JobResult(job, score, [], time.perf_counter() - start, len(train.labels), fitted)
