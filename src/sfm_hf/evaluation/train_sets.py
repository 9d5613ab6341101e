"""What Stage III trains on: synthetic sets (this run's and extra_synthetic) and the real-image baselines."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..backbones import FrozenBackbone
from ..baselines import centroid_positions, fetch_rows, neighbor_positions, random_positions, require_row_indices
from ..config import Config
from ..errors import StageInputError
from ..registry import DISTILL_METHODS, EVALUATION_MODES
from ..snapshots import read_images
from ..utils import share_from_main
from ..layout import FEATURES_DIR, IMAGES_FILE, SYNTHETIC_DIR, SYNTHETIC_JSON, RunLayout
from ..statistics import Statistics, load_feature_cache, open_config_split
from .errors import EvaluationError
from .features import features_of


def recorded_modes(names: list[str], kd_alphas: list[float]) -> list[str]:
    """The modes as recorded: a per-alpha mode (kd) once per alpha."""
    return [variant for name in names for variant in EVALUATION_MODES[name].variants(kd_alphas)]


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
    images, labels = read_images(folder / IMAGES_FILE)
    metadata = json.loads((folder / SYNTHETIC_JSON).read_text())
    return SyntheticSet(metadata["method"], images, labels, metadata, folder)


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
            synthetic_features = features_of(distill_backbone, chosen.images)
            positions = neighbor_positions(features, labels, synthetic_features, chosen.labels)
            rows[f"neighbors_{method}"] = indices[positions].tolist()
    return rows
