"""Typed configuration: dataclasses filled from a YAML recipe plus command-line overrides.

Every key a recipe may contain is a field below with a ``help`` text; ``--help`` on the
command line prints them all. Overrides use dotted paths: ``--ipc 2``,
``--distill.iterations 50``, ``--stages statistics,distill``.

Each section checks its own values (its ``validate``) and ``Config.validate`` what spans sections. A
config is filled after construction (recipe, then command line), so the checks run once it is
complete (``parse_config``), not in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .registry import DISTILL_METHODS, EVALUATION_MODES

NORMALIZATIONS = ("backbone", "imagenet")
DISTILL_INITS = ("auto", "noise", "centroids", "random")
# Starts that must read train images (auto falls back to noise where it cannot).
REAL_STARTS = ("centroids", "random")
STAGES = ("statistics", "distill", "evaluate", "export")


class ConfigError(UserError):
    """A recipe or command line that cannot be turned into a valid configuration."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataOptions:
    streaming: bool | None = option(
        None, "Stream the dataset instead of materialising it; null streams Hub ids and reads local folders directly."
    )
    batch_size: int = option(64, "Images per forward pass of the backbone when reading real data (per process).")
    num_workers: int = option(0, "DataLoader worker processes that decode and resize images.")
    crop_ratio: float = option(
        0.875,
        "Real images are resized so that their shorter side is image_size / crop_ratio, then centre-cropped to the "
        "backbone's image_size (224 / 256 = 0.875, as in the authors' statistics pass).",
    )
    normalization: str = option(
        "backbone",
        "Mean/std the backbone's inputs are normalised with, in Stage I, II, III and the exported bundle's image "
        "processor alike: 'backbone' (its own processor's, default) or 'imagenet' (the authors normalise every "
        "backbone with ImageNet's; the paper-reproduction recipes set it).",
    )
    max_samples_per_split: int | None = option(
        None, "Read at most this many examples of each split (quick trials); null reads everything."
    )

    def validate(self) -> None:
        _check_at_least_one("data", self, ("batch_size",))
        _check_choice("data.normalization", self.normalization, NORMALIZATIONS)
        if not 0 < self.crop_ratio <= 1:
            raise ConfigError(f"`data.crop_ratio` must be in (0, 1], got {self.crop_ratio}.")


@dataclass
class StatisticsOptions:
    non_target: str = option(
        "class_mean",
        "Non-target centre used for the statistical flow: 'class_mean' = mean of the other class means (authors' "
        "code, default) or 'sample' = mean of all real samples outside the class (the paper's Eq. 7 derivation). "
        "They agree on balanced data.",
    )

    def validate(self) -> None:
        _check_choice("statistics.non_target", self.non_target, ("class_mean", "sample"))


GOLDEN_RECIPES = ("converged", "authors")


@dataclass
class GoldenOptions:
    recipe: str = option(
        "converged",
        "How the golden classifier and every full-dataset reference probe are fitted: 'converged' = multinomial "
        "logistic regression to convergence (full-batch L-BFGS, L2 strength chosen on a held-out slice of the train "
        "features, then refitted on all of them), whatever the dataset size; 'authors' = their recipe (epochs of "
        "mini-batch Adam, cosine per epoch, init N(0, 0.01)), which under-trains small datasets.",
    )
    l2_grid: list[float] = option(
        help="converged: L2 strengths tried (penalty l2/2 * ||W||^2 on the mean cross-entropy); the best on the "
        "held-out slice of train wins.",
        factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6],
    )
    validation_fraction: float = option(
        0.1, "converged: fraction of every class of the train features held out to choose the L2 strength."
    )
    max_iterations: int = option(500, "converged: L-BFGS iterations at most per fit.")
    epochs: int = option(10, "authors: epochs of Adam over the cached train features (authors: 10).")
    lr: float = option(5e-4, "authors: Adam learning rate, cosine per epoch (authors: 0.001 x 128/256).")
    batch_size: int = option(128, "authors: mini-batch size.")
    weight_decay: float = option(0.0, "authors: weight decay.")

    def validate(self) -> None:
        _check_choice("golden.recipe", self.recipe, GOLDEN_RECIPES)
        if not self.l2_grid or any(l2 < 0 for l2 in self.l2_grid):
            raise ConfigError(f"`golden.l2_grid` must hold L2 strengths >= 0, got {self.l2_grid}.")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"`golden.validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        _check_at_least_one("golden", self, ("epochs", "batch_size", "max_iterations"))
        _check_positive("golden", self, ("lr",))


@dataclass
class DistillOptions:
    method: str = option(
        "sfm", "Objective: " + ", ".join(f"{method.name} ({method.summary})" for method in DISTILL_METHODS.values()) + "."
    )
    iterations: int = option(5000, "Optimisation steps.")
    lr: float = option(0.002, "Adam learning rate on the image parameters.")
    representation: str = option("pyramid", "Image parameterisation: pyramid (authors) or pixel.")
    init: str = option(
        "auto",
        "Start of the synthetic images: noise (the paper's), centroids (real train images nearest to the k-means "
        "centres of each class's phi_d features, k = ipc: the class mean for ipc 1), random (ipc random train "
        "images per class) or auto: centroids where Stage I's feature cache of a non-streamed train split is at "
        "hand, noise otherwise (streamed Hub data, statistics_from). Real starts are decoded exactly at step 0. "
        "auto is the default because centroids beat noise and random on validation for both ImageNet CNNs at "
        "ipc 1 and 10 in the real-data benchmark (benchmarks/README.md).",
    )
    syn_res: int | str = option(
        "auto",
        "Side of the synthetic images in pixels (the pyramid's finest level); auto: the smallest power of two >= "
        "image_size / crop_ratio of the distillation backbone (256 for 224-px backbones, as in the paper; 32 for "
        "the demo's 28-px one), so views are cropped from at least the resolution real images are seen at.",
    )
    pyramid_every: int = option(200, "Add a pyramid level every this many steps.")
    decorrelate: bool = option(True, "Apply the Lucid colour decorrelation when decoding the pyramid.")
    reset_optimizer_on_growth: bool = option(
        True, "Re-create Adam (its moments are lost) when the pyramid grows, as the authors do."
    )
    aug_rounds: int = option(1, "Augmented copies of every synthetic image per step (SFM: 1; LGM: 10).")
    noise_std: float = option(0.2, "Std of the Gaussian noise augmentation.")
    noise_p: float = option(0.5, "Probability that an augmented view receives Gaussian noise.")
    noise_mean: float = option(
        0.0,
        "Mean of the Gaussian noise. 0 keeps the image's brightness on average; the code behind the paper's numbers "
        "used 0.5 (a brightening shift), which the paper-reproduction recipes set.",
    )
    decoupled_alpha: float | None = option(
        None,
        "tcdd / ncdd: weight alpha of the authors' decoupled loss alpha*MSE(mu*, m) + (1-alpha)*MSE(nu*, nu^s); "
        "null: 1 for tcdd (target centres only), 0 for ncdd (non-target centres only).",
    )
    lgm_w_mode: str = option(
        "random", "LGM head: random (new W ~ N(0, 0.01^2) every step), fixed (one W per run), analytic (softmax -> 1/C)."
    )
    mixed_precision: str = option("no", "Autocast for the backbone forward: no or bf16 (no loss scaling needed).")
    compile: bool = option(False, "torch.compile the backbone forward.")
    checkpoint_chunk: int = option(
        0,
        "Activation checkpointing of the backbone in chunks of this many synthetic views: the backward pass re-runs "
        "one chunk's forward at a time, so peak memory holds one chunk's activations instead of all views' for about "
        "one extra forward pass; 0 keeps all activations (fastest).",
    )
    checkpoint_every: int = option(500, "Write a resumable checkpoint every this many steps (0 disables).")
    preview_every: int = option(0, "Write preview.png of the current images every this many steps (0: only at the end).")
    log_every: int = option(50, "Report the loss to the progress bar and trackers every this many steps.")

    def validate(self) -> None:
        _check_choice("distill.method", self.method, tuple(DISTILL_METHODS))
        _check_choice("distill.representation", self.representation, ("pyramid", "pixel"))
        _check_choice("distill.init", self.init, DISTILL_INITS)
        _check_choice("distill.lgm_w_mode", self.lgm_w_mode, ("random", "fixed", "analytic"))
        _check_choice("distill.mixed_precision", self.mixed_precision, ("no", "bf16"))
        _check_at_least_one("distill", self, ("iterations", "pyramid_every", "aug_rounds", "log_every"))
        if self.syn_res != "auto" and (not isinstance(self.syn_res, int) or self.syn_res < 1):
            raise ConfigError(f"`distill.syn_res` must be auto or an integer >= 1, got {self.syn_res!r}.")
        if self.decoupled_alpha is not None and not 0 <= self.decoupled_alpha <= 1:
            raise ConfigError(f"`distill.decoupled_alpha` must lie in [0, 1], got {self.decoupled_alpha}.")
        _check_positive("distill", self, ("lr",))
        if self.checkpoint_chunk < 0:
            raise ConfigError(f"`distill.checkpoint_chunk` must be >= 0 (0 disables), got {self.checkpoint_chunk}.")

    @property
    def resolved_alpha(self) -> float:
        """alpha of the decoupled tcdd / ncdd loss."""
        if self.decoupled_alpha is not None:
            return self.decoupled_alpha
        return DISTILL_METHODS[self.method].decoupled_alpha

    def resolution(self, image_size: int, crop_ratio: float) -> int:
        """The synthetic side in pixels: ``syn_res``, or for auto the smallest power of two >= image_size / crop_ratio."""
        if self.syn_res != "auto":
            return int(self.syn_res)
        return 1 << max(0, math.ceil(math.log2(image_size / crop_ratio - 1e-9)))


EVALUATE_PROTOCOLS = ("converge", "authors")
BASELINE_TRAIN_SETS = ("random", "centroids", "neighbors")


@dataclass
class EvaluateOptions:
    modes: list[str] = option(
        help="Ways to train on each synthetic set: "
        + ", ".join(f"{mode.name} ({mode.summary})" for mode in EVALUATION_MODES.values()) + ". Tab. 5 and Fig. 3.",
        factory=lambda: ["vanilla", "ci"],
    )
    train_sets: list[str] = option(
        help="Train sets: random, centroids, neighbors (real images; neighbors of every evaluated synthetic set) and "
        f"synthetic sets named by their distillation method ({', '.join(DISTILL_METHODS)}): this run's synthetic/ folder, or "
        "one from extra_synthetic. The full-dataset probe and the golden classifier are always reported as "
        "reference rows.",
        factory=lambda: ["random", "centroids", "sfm"],
    )
    baseline_modes: list[str] = option(
        help="Modes for the real-image baselines (the paper reports them with vanilla only).",
        factory=lambda: ["vanilla"],
    )
    extra_synthetic: list[str] = option(
        help="Synthetic sets of other runs to evaluate beside this run's (their output_dir or synthetic/ folder), "
        "e.g. an LGM run for the Tab. 2 comparison; each is named by its method.",
        factory=list,
    )
    trials: int = option(5, "Trials per result (seeds seed_base + k); mean and population std are reported.")
    seed_base: int = option(3407, "Seed of trial 0 (LGM/SFM evaluation code: 3407).")
    protocol: str = option(
        "converge",
        "How long and at which learning rates heads and projectors train. 'converge' (default): lr and projector_lr "
        "as given (no batch scaling), `iterations` steps, then retrained from the same start for twice as long "
        "while that still raises the accuracy on a validation slice of the real TRAIN features by more than "
        "plateau_tolerance, up to max_iterations, so every probe reaches its plateau whatever the number of images. 'authors' (their code): "
        "lr and projector_lr scaled by min(batch, N)/256, `epochs` epochs at batch min(batch_size, N), cosine "
        "stepped per epoch.",
    )
    iterations: int = option(1000, "converge: first length (steps) of every head / projector training (each phase of st).")
    max_iterations: int = option(16000, "converge: the doubling of `iterations` stops here (results say if it plateaued).")
    plateau_tolerance: float = option(
        0.005, "converge: largest validation accuracy gain of a twice-as-long training that still counts as a plateau."
    )
    validation_images: int = option(
        2000,
        "converge: real train images (their cached features, a fixed random subset) on which the plateau is checked; "
        "never the eval split.",
    )
    epochs: int = option(1000, "authors: epochs of every head / projector training (authors: 1000).")
    batch_size: int = option(
        100, "Train images per step (at most the set's size); each step augments them anew (or draws from view_bank)."
    )
    view_bank: int = option(
        64,
        "N > 0 (default 64): each trial forwards N augmented views of every train image once per backbone, and each "
        "of its trainings (every mode, every plateau phase, the ridge solve) uses at step s each image's view s mod N, "
        "the very view fresh views would give it at step s: identical to view_bank 0 for the first N steps, after "
        "which views recur. A linear probe then costs N x images forwards per trial instead of batch x steps per "
        "training (benchmarks/README.md, Stage III cost). 0: the paper's protocol, fresh augmented views through "
        "the backbones every step (slow: minutes per training on a CPU). Holds N x images x feature_dim float32 "
        "per backbone, capped by view_bank_max_mib. A record's `seconds` then leaves the banked forwards out; "
        "`view_bank_seconds` gives them, on the row whose training asked first.",
    )
    view_bank_max_mib: float = option(
        4096.0,
        "Memory cap of one trial's view bank (and of the plateau-search bank) in MiB: when N views of every train "
        "image through every backbone would not fit, the bank holds as many views as fit (a logged line says so), "
        "and with not even one it falls back to fresh views.",
    )
    plateau_search_views: int = option(
        64,
        "converge with view_bank 0: the plateau search (iterations, doubled while validation improves) runs on a "
        "bank of this many views per image (cheap linear steps), then the chosen length is trained once with fresh "
        "views; records say `plateau_search_views`. 0: search with fresh views, retraining from the start at each "
        "doubling (the exact search, several times the cost).",
    )
    lr: float = option(
        0.001, "Adam learning rate of linear heads (cosine, no decay); authors: at a batch of 256, scaled by "
        "min(batch, N)/256."
    )
    projector_lr: float = option(
        0.01, "Adam learning rate of projectors (ci, jt, st; cosine); authors: scaled by min(batch, N)/256."
    )
    projector: str = option(
        "sgd",
        "How the projector of ci / st / st_ip is fitted: sgd (Eq. 10, Adam under `protocol`) or ridge (one "
        "closed-form least-squares solve over ridge_views augmented views, regularised towards the identity when "
        "phi_e and phi_d have the same size, towards zero otherwise).",
    )
    ridge_views: int = option(
        4000, "ridge: augmented views of the train images (drawn like the SGD projector's) that the solve uses."
    )
    ridge_lambdas: list[float] = option(
        help="ridge: candidate penalties, relative to the mean per-dimension variance of phi_e; the one with the "
        "least held-out error when the views of each of ridge_folds groups of classes are held out in turn is "
        "used (never the eval split).",
        factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
    )
    ridge_folds: int = option(5, "ridge: groups of classes held out in turn to choose the penalty (at most C).")
    kd_temperature: float = option(4.0, "Temperature of the golden classifier's soft labels for kd (authors: 4).")
    kd_alphas: list[float] = option(
        help="Weights alpha of the KL term in alpha*KL + (1-alpha)*CE; kd runs once per value (Fig. 3 left).",
        factory=lambda: [0.5],
    )
    full_dataset: bool = option(
        True,
        "Train the full-dataset probe of every eval backbone (golden options, cached centre-crop features). An eval "
        "backbone other than the distillation one then needs one pass over the train split.",
    )
    curve_points: int = option(
        10,
        "Points of the accuracy-vs-iteration curve kept for the plot (scored on the eval split for the plot only; "
        "nothing is ever selected on it). 0: no curve.",
    )

    def validate(self) -> None:
        for key, values, choices in (
            ("evaluate.modes", self.modes, tuple(EVALUATION_MODES)),
            ("evaluate.baseline_modes", self.baseline_modes, tuple(EVALUATION_MODES)),
            ("evaluate.train_sets", self.train_sets, BASELINE_TRAIN_SETS + tuple(DISTILL_METHODS)),
        ):
            for value in values:
                _check_choice(key, value, choices)
        _check_at_least_one(
            "evaluate", self, ("trials", "iterations", "max_iterations", "epochs", "validation_images", "batch_size")
        )
        if self.view_bank < 0:
            raise ConfigError(f"`evaluate.view_bank` must be >= 0 (0: fresh views every step), got {self.view_bank}.")
        if self.plateau_search_views < 0:
            raise ConfigError(f"`evaluate.plateau_search_views` must be >= 0, got {self.plateau_search_views}.")
        _check_positive("evaluate", self, ("lr", "projector_lr", "kd_temperature", "view_bank_max_mib"))
        _check_choice("evaluate.protocol", self.protocol, EVALUATE_PROTOCOLS)
        if self.max_iterations < self.iterations:
            raise ConfigError(
                f"`evaluate.max_iterations` ({self.max_iterations}) must be >= `evaluate.iterations` ({self.iterations})."
            )
        if self.plateau_tolerance < 0:
            raise ConfigError(f"`evaluate.plateau_tolerance` must be >= 0, got {self.plateau_tolerance}.")
        _check_choice("evaluate.projector", self.projector, ("sgd", "ridge"))
        if self.ridge_views < 1 or self.ridge_folds < 2:
            raise ConfigError(
                f"`evaluate.ridge_views` must be >= 1 and `evaluate.ridge_folds` >= 2, got {self.ridge_views} and "
                f"{self.ridge_folds}."
            )
        if not self.ridge_lambdas or any(value < 0 for value in self.ridge_lambdas):
            raise ConfigError(f"`evaluate.ridge_lambdas` needs values >= 0, got {self.ridge_lambdas}.")
        if self.curve_points < 0:
            raise ConfigError(f"`evaluate.curve_points` must be >= 0, got {self.curve_points}.")
        if any(not 0 <= alpha <= 1 for alpha in self.kd_alphas):
            raise ConfigError(f"`evaluate.kd_alphas` must lie in [0, 1], got {self.kd_alphas}.")
        per_alpha = [name for name in self.modes + self.baseline_modes if EVALUATION_MODES[name].per_alpha]
        if per_alpha and not self.kd_alphas:
            raise ConfigError(f"Mode {per_alpha[0]} needs at least one value in `evaluate.kd_alphas`.")
        if "neighbors" in self.train_sets and not self.synthetic_train_sets:
            raise ConfigError("Train set `neighbors` needs a synthetic set in `evaluate.train_sets` (e.g. sfm).")

    @property
    def synthetic_train_sets(self) -> list[str]:
        """The train sets that are synthetic sets, named by their distillation method."""
        return [name for name in self.train_sets if name in DISTILL_METHODS]


HUB_FOLDERS = ("dataset", "model", "statistics")
HUB_PLACEHOLDERS = ("org", "dataset", "backbone", "eval_backbone", "ipc", "method")


@dataclass
class HubOptions:
    push: bool = option(
        False,
        "Upload the exported folders to the Hugging Face Hub (main process only). The token comes from the usual "
        "huggingface_hub places (HF_TOKEN, `hf auth login`) and is never printed or written.",
    )
    org: str = option("", "User or organisation owning the repos ({org}); required when push is true.")
    dataset_repo: str = option(
        "{org}/sfm-{dataset}-ipc{ipc}",
        "Dataset repo of the synthetic images: one per (source dataset, ipc), each distillation backbone a named "
        "config. Placeholders: {org} {dataset} {backbone} {eval_backbone} {ipc} {method}.",
    )
    dataset_config_name: str = option(
        "{backbone}",
        "This run's config name in the dataset repo (same placeholders), e.g. '{backbone}-ipc{ipc}' to keep several "
        "ipc in one repo.",
    )
    model_repo: str = option(
        "{org}/sfm-{dataset}-{backbone}-ipc{ipc}",
        "Model repo of the classifier bundle (same placeholders; add {eval_backbone} when bundles for several "
        "evaluation backbones are pushed).",
    )
    statistics_repo: str = option(
        "{org}/sfm-{dataset}-{backbone}-statistics",
        "Model repo of the Stage I statistics and golden classifier (same placeholders).",
    )
    private: bool = option(False, "Create the repos as private.")
    revision: str | None = option(
        None, "Branch to commit to (created from the default branch when missing); null: the default branch (main)."
    )
    create_pr: bool = option(
        False, "Open a pull request with each repo's commit instead of committing to the branch (review first)."
    )
    folders: list[str] = option(
        help=f"Folders to export and push: {', '.join(HUB_FOLDERS)} (the synthetic dataset is always exported; "
        "drop model for an open_clip evaluation backbone, statistics to keep them private).",
        factory=lambda: list(HUB_FOLDERS),
    )
    dataset_name: str | None = option(
        None, "Short name of the source dataset in repo names ({dataset}), e.g. in100; null: last part of `dataset`."
    )
    backbone_name: str | None = option(
        None, "Short name of the distillation backbone ({backbone}), e.g. dinov2; null: last part of `backbone`."
    )
    eval_backbone: str | None = option(
        None,
        "Evaluation backbone held by the model bundle; null: the first of `eval_backbones` (the distillation "
        "backbone when that list is empty).",
    )
    embed_backbone: bool = option(
        True,
        "Save the evaluation backbone's weights inside model/ (self-contained); false stores only its Hub id, and "
        "from_pretrained loads the weights from there.",
    )
    license: str | None = option(
        None, "License field of the dataset and model cards; null: the source dataset's license when known."
    )
    include_runs: list[str] = option(
        help="output_dirs of other exported runs (another backbone or ipc) whose dataset configs are copied into "
        "this run's synthetic/ as further named configs.",
        factory=list,
    )

    def validate(self) -> None:
        import string

        for folder in self.folders:
            _check_choice("hub.folders", folder, HUB_FOLDERS)
        for key in ("dataset_repo", "dataset_config_name", "model_repo", "statistics_repo"):
            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(getattr(self, key)) if name is not None]
            except ValueError as error:
                raise ConfigError(f"`hub.{key}` is not a valid template: {error}.") from None
            unknown = [name for name in fields if name not in HUB_PLACEHOLDERS]
            if unknown:
                raise ConfigError(f"`hub.{key}` uses unknown placeholder(s) {unknown}; known: {list(HUB_PLACEHOLDERS)}.")
        if self.push and not self.org:
            raise ConfigError("`hub.push` is true but `hub.org` is empty: give your user or organisation name.")


@dataclass
class Config:
    dataset: str = option(
        "",
        "Hub dataset id, a local Hub-layout folder (parquet/arrow files), or an image folder with split folders "
        "(train/, test/) each holding one sub-folder per class.",
    )
    dataset_config: str | None = option(None, "Named configuration of the dataset, if it has several.")
    train_split: str = option("train", "Split used for statistics, the golden classifier and real baselines.")
    eval_split: str = option("test", "Split used only for reporting accuracy; never for selection.")
    image_column: str | None = option(None, "Image column; null detects the first Image feature.")
    label_column: str | None = option(None, "Label column; null detects the first ClassLabel feature or a 'label' column.")
    backbone: str | list[str] = option(
        "",
        "Distillation backbone phi_d: Hub id, local folder, or open_clip 'hf-hub:'/'local-dir:' id. A list distils "
        "one joint synthetic set for all of them (mean of their SFM losses); each listed backbone then gets its own "
        "run folder <output_dir>/backbones/<slug>/ with its statistics, golden classifier and evaluation.",
    )
    eval_backbones: list[str] = option(
        help="Evaluation backbones phi_e; empty means the distillation backbone only.", factory=list
    )
    ipc: int = option(1, "Synthetic images per class.")
    output_dir: str = option("outputs/run", "Folder for every output of the run; stages read earlier stages from here.")
    stages: list[str] = option(help=f"Stages to run, in this order: {', '.join(STAGES)}.", factory=lambda: list(STAGES[:2]))
    seed: int = option(0, "Seed for every random choice of the run.")
    trackers: list[str] = option(
        help="Accelerate experiment trackers (tensorboard, wandb, mlflow, ..., or all); logs under <output_dir>. "
        "Empty: none. On the command line also --report_to, as in the transformers example scripts.",
        factory=list,
    )
    progress: str = option(
        "auto",
        "Progress of long loops: auto (a bar on a terminal, otherwise a log line every 10%), bar, lines or off.",
    )
    tracker_project: str = option(
        "sfm-hf", "Project (run group) name given to the trackers, e.g. the wandb project or tensorboard sub-folder."
    )
    data: DataOptions = option(help="Reading real images.", factory=DataOptions)
    statistics: StatisticsOptions = option(help="Stage I: class statistics.", factory=StatisticsOptions)
    golden: GoldenOptions = option(help="Stage I: the golden classifier.", factory=GoldenOptions)
    distill: DistillOptions = option(help="Stage II: distillation.", factory=DistillOptions)
    evaluate: EvaluateOptions = option(help="Stage III: evaluation.", factory=EvaluateOptions)
    statistics_from: str | list[str] | None = option(
        None,
        "Hub repo id or local folder holding statistics.safetensors + statistics.json (+ golden_classifier.*) of "
        "an earlier Stage I: distill (and export) read them instead of <output_dir>/statistics, so no real data "
        "is needed. A list of them (shards of one dataset: other machines, sites, new data) is merged exactly into "
        "<output_dir>/statistics first (see sfm_hf.merge; on the command line: --statistics_from '[a, b]').",
    )
    hub: HubOptions = option(help="Export and publishing to the Hugging Face Hub.", factory=HubOptions)

    @property
    def reads_real_data(self) -> bool:
        """Whether the stages read images of the dataset: Stage I and III always, distill for LGM or a real start."""
        method = DISTILL_METHODS.get(self.distill.method)  # None for a misspelt one: validate() says so
        return bool({"statistics", "evaluate"} & set(self.stages)) or (
            "distill" in self.stages
            and ((method is not None and method.reads_real_images) or self.distill.init in REAL_STARTS)
        )

    def validate(self) -> None:
        if not self.dataset and (self.reads_real_data or not self.statistics_from):
            raise ConfigError(
                "`dataset` is empty: give a Hub id or a local folder (only SFM distillation from noise "
                "(`distill.init: noise`) and export from `statistics_from` need no real data)."
            )
        if self.statistics_from and "statistics" in self.stages:
            raise ConfigError(
                "`statistics_from` replaces the 'statistics' stage; remove it from `stages` or unset `statistics_from`."
            )
        if not self.backbone:
            raise ConfigError("`backbone` is empty: give a Hub id or a local model folder.")
        if isinstance(self.backbone, list):
            self._validate_backbone_list()
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"Unknown stage(s) {unknown}; valid stages are {list(STAGES)}.")
        if not self.stages:
            raise ConfigError("`stages` is empty; nothing to run.")
        # Each stage reads what the earlier ones wrote: run out of order, a stage would read the
        # previous run's outputs and the two runs would mix. Refused rather than reordered, so that
        # config.yaml never records an order that did not run.
        in_order = sorted(dict.fromkeys(self.stages), key=STAGES.index)
        if self.stages != in_order:
            raise ConfigError(
                f"`stages` {','.join(self.stages)} is out of order or repeats a stage: each stage reads the outputs of "
                f"the ones before it, so they run in the order {','.join(STAGES)}; write --stages {','.join(in_order)}."
            )
        if self.ipc < 1:
            raise ConfigError(f"`ipc` must be >= 1, got {self.ipc}.")
        _check_choice("progress", self.progress, ("auto", "bar", "lines", "off"))
        for section in (self.data, self.statistics, self.golden, self.distill, self.evaluate, self.hub):
            section.validate()
        self._check_synthetic_sets_reachable()

    def _validate_backbone_list(self) -> None:
        if len(self.backbone) == 1:
            self.backbone = self.backbone[0]
            return
        if any(not name for name in self.backbone) or len(set(self.backbone)) != len(self.backbone):
            raise ConfigError(f"`backbone` lists an empty or repeated name: {self.backbone}; list each backbone once.")
        if self.statistics_from:
            raise ConfigError(
                "`statistics_from` holds the statistics of one backbone; with a list of backbones, run the "
                "'statistics' stage (each backbone's goes to <output_dir>/backbones/<slug>/statistics)."
            )
        extra = [folder for folder in self.hub.folders if folder != "dataset"]
        if "export" in self.stages and extra:
            raise ConfigError(
                f"A joint synthetic set exports only its dataset (`hub.folders: [dataset]`), not {extra}: export each "
                "backbone's statistics and model from its own run."
            )

    @property
    def backbones(self) -> list[str]:
        """The distillation backbone(s) as a list (one item for a single backbone)."""
        return list(self.backbone) if isinstance(self.backbone, list) else [self.backbone]

    def _check_synthetic_sets_reachable(self) -> None:
        """Catch before an expensive distillation a synthetic train set that only evaluation would miss."""
        if "evaluate" not in self.stages or "distill" not in self.stages or self.evaluate.extra_synthetic:
            return
        missing = [name for name in self.evaluate.synthetic_train_sets if name != self.distill.method]
        if missing:
            raise ConfigError(
                f"`evaluate.train_sets` asks for synthetic set(s) {missing}, but this run distils with "
                f"{self.distill.method!r} and `evaluate.extra_synthetic` is empty: add the folder of a run made "
                f"with {missing[0]!r} there, or remove it from the train sets."
            )

    @property
    def evaluation_backbones(self) -> list[str]:
        return self.eval_backbones or self.backbones

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .utils import write_text_atomically

        write_text_atomically(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.")


def _check_at_least_one(section: str, options: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value < 1:
            raise ConfigError(f"`{section}.{name}` must be >= 1, got {value}.")


def _check_positive(section: str, options: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value <= 0:
            raise ConfigError(f"`{section}.{name}` must be > 0, got {value}.")


class CommandLineText(str):
    """A value typed on the command line: read by the field's declared type, never as YAML."""


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
NULL_WORDS = ("null", "none", "~")


def _from_text(text: str, hint: Any, key: str) -> Any:
    """Command-line text -> a value of ``hint``; strings stay exactly as typed."""
    text = str(text)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(None) in options and text.strip().lower() in NULL_WORDS:
            return None
        # The declared order decides (`int | str` reads 256 as a number, auto as text), except that
        # bracketed text is a list where the field allows one (`str | list[str]`: '[a, b]').
        bracketed = text.strip().startswith("[") and text.strip().endswith("]")
        options = sorted(options, key=lambda option: not (bracketed and typing.get_origin(option) is list))
        errors = []
        for option_hint in options:
            if option_hint is type(None):
                continue
            try:
                return _from_text(text, option_hint, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        inner = text.strip()
        if inner.startswith("[") and inner.endswith("]"):
            inner = inner[1:-1]
        return [_from_text(part.strip(), item_hint, key) for part in inner.split(",") if part.strip()]
    if hint is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ConfigError(f"`{key}` expects true or false, got {text!r}.")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"`{key}` expects an integer, got {text!r}.") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"`{key}` expects a finite number, got {text!r}.") from None
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` (YAML-parsed, or a command-line string) against a field's type, converting safe cases.

    Command-line text goes through :func:`_from_text` first, so its strings stay verbatim
    (``--dataset_config 1.10`` is '1.10', never the number 1.1).
    """
    if isinstance(value, CommandLineText):
        value = _from_text(value, hint, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_hint in options:
            if option_hint is type(None):
                continue
            try:
                return _coerce(value, option_hint, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` expects a list, got {value!r}.")
        return [_coerce(item, item_hint, key) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` expects true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"`{key}` expects an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number to anyone writing a recipe.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"`{key}` expects a finite number, got {value!r}.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"`{key}` expects a string, got {value!r}.")
    raise ConfigError(f"`{key}` has an unsupported type {hint!r}.")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint)


def _apply(target: Any, key_path: str, value: Any) -> None:
    *parents, leaf = key_path.split(".")
    node = target
    walked = []
    for part in parents:
        hints = typing.get_type_hints(type(node))
        if part not in hints or not _is_section(hints[part]):
            raise ConfigError(f"Unknown section `{'.'.join(walked + [part])}`. Known keys: {_known_keys(type(target))}")
        node = getattr(node, part)
        walked.append(part)
    hints = typing.get_type_hints(type(node))
    if leaf not in hints:
        raise ConfigError(f"Unknown key `{key_path}`. Known keys: {_known_keys(type(target))}")
    if _is_section(hints[leaf]):
        if not isinstance(value, dict):
            raise ConfigError(f"`{key_path}` is a section; give it a mapping of keys.")
        for sub_key, sub_value in value.items():
            _apply(target, f"{key_path}.{sub_key}", sub_value)
        return
    setattr(node, leaf, _coerce(value, hints[leaf], key_path))


def _known_keys(cls: type, prefix: str = "") -> str:
    return ", ".join(name for name, _ in iter_options(cls, prefix))


def iter_options(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every leaf option as (dotted key, field), sections flattened."""
    hints = typing.get_type_hints(cls)
    for name, f in _fields(cls).items():
        if _is_section(hints[name]):
            yield from iter_options(hints[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


def config_from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    config = base if base is not None else Config()
    for key, value in values.items():
        _apply(config, key, value)
    return config


def load_recipe(path: str | Path, base: Config | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe {str(path)!r} does not exist.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"Recipe {str(path)!r} must be a YAML mapping of keys, got {type(values).__name__}.")
    return config_from_dict(values, base)


def help_text() -> str:
    lines = ["Options (YAML keys of a recipe, or --key value on the command line):"]
    for key, f in iter_options():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{key} (default: {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def option_type(key_path: str, cls: type = None) -> Any:
    """The declared type of a dotted option, or None when no such leaf option exists."""
    node = Config if cls is None else cls
    *parents, leaf = key_path.split(".")
    for part in parents:
        hint = typing.get_type_hints(node).get(part)
        if hint is None or not _is_section(hint):
            return None
        node = hint
    return typing.get_type_hints(node).get(leaf)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config PATH`` from ``--key value`` / ``--key=value`` overrides.

    Values stay text (:class:`CommandLineText`), read later by each field's declared type. A
    boolean option given alone (``--hub.push``, followed by another option or nothing) means true,
    as in the Hugging Face example scripts.
    """
    recipe = None
    overrides: dict[str, Any] = {}
    position = 0
    while position < len(argv):
        token = argv[position]
        if not token.startswith("--"):
            raise ConfigError(f"Unexpected argument {token!r}: options look like --key value.")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            position += 1
        elif position + 1 >= len(argv) or argv[position + 1].startswith("--"):
            key = token[2:]
            if key == "config" or option_type(key) not in (bool, None):
                raise ConfigError(f"Option {token} needs a value.")
            # An unknown key gets its "Unknown key" message (with the known ones) when applied.
            raw = "true"
            position += 1
        else:
            key, raw = token[2:], argv[position + 1]
            position += 2
        if key == "config":
            recipe = raw
        else:
            overrides[key] = CommandLineText(raw)
    return recipe, overrides


def parse_config(argv: list[str], default: Config | None = None) -> Config:
    """Recipe (``--config``) or ``default``, then command-line overrides, then validation."""
    recipe, overrides = parse_overrides(argv)
    if recipe is not None:
        config = load_recipe(recipe)
    elif default is not None:
        config = default
    else:
        raise ConfigError("No recipe given: pass --config recipes/<name>.yaml.")
    config = config_from_dict(overrides, config)
    config.validate()
    return config
