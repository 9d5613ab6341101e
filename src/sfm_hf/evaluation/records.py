"""Trainings' results as records (results.json), the reference rows, the tables, plots and summary."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from accelerate.logging import get_logger

from ..backbones import FrozenBackbone
from ..config import Config, EvaluateOptions
from .. import hub
from ..probe import accuracy
from ..registry import parse_mode
from ..names import short_name
from ..utils import library_versions, write_text_atomically
from ..layout import CURVES_PLOT, FLOW_PLOT, GOLDEN_JSON, RunLayout, projector_path
from ..statistics import Statistics
from .features import FeatureSet, EvalBackbone, features_of
from .projectors import load_projector
from .train_sets import SyntheticSet, TrainSet

logger = get_logger(__name__)


FULL_DATASET = "full_dataset"
# What the reference rows (full-dataset probe, golden classifier) read of the real data: all of it, by definition.
WHOLE_TRAIN_SPLIT = "whole train split"


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


def build_records(
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
                if train_set.name == own_method and parse_mode(mode)[0].bundles_projector:
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
        # Evaluated on the distillation backbone itself: for a mode that predicts through the golden classifier
        # (ci, fused) the projector's optimum is then the identity whatever the images (report.py marks such rows).
        "same_network": model.name == config.backbone,
        **_summary([trial.accuracy for trial in trials]),
        "ipc": train_set.ipc,
        "iterations": max(steps),
        "steps_per_trial": steps,
        "seconds": round(sum(trial.seconds for trial in trials), 3),
        "images": trials[0].images,
        "seeds": [options.seed_base + trial.job.trial for trial in trials],
        **{key: value for key, value in trials[0].details.items()
           if key not in ("steps", "plateau", "validation_accuracy", "ridge_lambda", "fusion_weight",
                          "view_bank_seconds")},
    }
    if "view_bank_seconds" in trials[0].details:
        record["view_bank_seconds"] = round(sum(trial.details["view_bank_seconds"] for trial in trials), 3)
    for chosen in ("ridge_lambda", "fusion_weight"):  # chosen per trial
        if chosen in trials[0].details:
            record[chosen] = [trial.details[chosen] for trial in trials]
    if "plateau" in trials[0].details:
        record["plateau_reached"] = all(trial.details["plateau"] for trial in trials)
    if "validation_accuracy" in trials[0].details:
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
        "real_eval_data": [WHOLE_TRAIN_SPLIT],
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
        "real_eval_data": [WHOLE_TRAIN_SPLIT],
        "note": "linear probe on cached centre-crop features of the whole train split (golden.* options)",
    }


def write_outputs(
    config: Config,
    records: list[dict[str, Any]],
    statistics: Statistics,
    distill_backbone: FrozenBackbone,
    synthetic: dict[str, SyntheticSet],
) -> None:
    from ..report import plot_accuracy_curves, plot_flow_pca, write_markdown

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
        flows = {method: (features_of(distill_backbone, chosen.images), chosen.labels)
                 for method, chosen in synthetic.items()}
        plot_flow_pca(statistics.class_means, statistics.class_counts, flows, statistics.class_names,
                      folder / FLOW_PLOT, non_target=config.statistics.non_target)
    write_markdown(records, layout.results_markdown, title=f"Results: {short_name(config.dataset)}, ipc {config.ipc}")


def print_summary(config: Config, records: list[dict[str, Any]], trainings: int, seconds: float,
                   world_size: int) -> None:
    from ..report import paper_tables

    options = config.evaluate
    reference = EvaluateOptions()
    length = {"authors": f"{options.epochs} epochs each", "fixed": f"{options.iterations} steps each",
              "converge": f"{options.iterations} steps or more each, until the real validation accuracy plateaus"}[
        options.protocol]
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
