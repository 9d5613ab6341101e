"""The options of Stage III (``evaluate.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import DISTILL_METHODS, EVALUATION_MODES
from .options import ConfigError, check_at_least_one, check_choice, check_positive, option


EVALUATE_PROTOCOLS = ("converge", "authors")
BASELINE_TRAIN_SETS = ("random", "centroids", "neighbors")
RIDGE_CHOICES = ("folds", "validation")


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
        "as given (no batch scaling), `iterations` steps under a cosine to 0, then the same run continues with a new "
        "cosine cycle as long as everything before it (doubling its length) while the last cycle raised the accuracy "
        "on a validation slice of the real TRAIN features by more than plateau_tolerance, up to max_iterations, so "
        "every probe reaches its plateau whatever the number of images. 'authors' (their code): "
        "lr and projector_lr scaled by min(batch, N)/256, `epochs` epochs at batch min(batch_size, N), cosine "
        "stepped per epoch.",
    )
    iterations: int = option(1000, "converge: first cosine cycle (steps) of every head / projector training (each phase of st).")
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
        256,
        "N > 0 (default 256): each trial forwards N augmented views of every train image once per backbone, and "
        "each of its trainings (every mode, every plateau cycle, the ridge solve) uses at step s each image's view "
        "s mod N, the very view fresh views would give it at step s: identical to view_bank 0 for the first N "
        "steps, after which views recur. A linear probe then costs N x images forwards per trial instead of batch x "
        "steps per training (docs/performance.md, Stage III at default settings: 161-172 s vs 3729 s, every row "
        "within 1 pt of fresh views). Fewer views are cheaper but stop a long SGD CI projector earlier (64: SFM+CI "
        "91.0 vs 93.5 %). 0: the paper's protocol, fresh augmented views through the backbones every step (slow: "
        "minutes per training on a CPU). Holds N x images x feature_dim float32 per backbone, capped by view_bank_max_mib. A "
        "record's `seconds` then leaves the banked forwards out; `view_bank_seconds` gives them, on the row whose "
        "training asked first.",
    )
    view_bank_max_mib: float = option(
        4096.0,
        "Memory cap of one trial's view bank in MiB: when N views of every train "
        "image through every backbone would not fit, the bank holds as many views as fit (a logged line says so), "
        "and with not even one it falls back to fresh views.",
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
    ridge_choice: str = option(
        "folds",
        "ridge: how the penalty is chosen from ridge_lambdas. folds (default): the least held-out projection error "
        "over ridge_folds groups of classes (the train images' views alone). validation: the best accuracy of the "
        "CI predictor (golden classifier on the projection) on the validation slice of real TRAIN features that "
        "protocol converge checks its plateau on (needs protocol converge; never the eval split).",
    )
    projector_anchors: float = option(
        1.0,
        "Weight of the real class-mean anchors in the projector fit of ci / st / st_ip / fused (0: off, the paper's "
        "Eq. 10 alone). One pair per class: the eval backbone's mean TRAIN feature of the class -> the distillation "
        "backbone's class mean from Stage I (the same real images); the SGD projector sees the C pairs beside every "
        "batch of views, each weighing as much as one view, and the ridge solve the same objective. They tie the "
        "projector to where real data lies, which 1-10 synthetic images per class cannot.",
    )
    fusion_weights: list[float] = option(
        help="fused: candidate weights w of w * log_softmax(CI logits) + (1 - w) * log_softmax(vanilla head logits); "
        "the one with the best accuracy on the validation slice of real TRAIN features is used (needs protocol "
        "converge; ties go to the first listed).",
        factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
    )
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
    time_to_quality: bool = option(
        False,
        "Also score every snapshot of each evaluated synthetic set (distill.snapshot_every) with the same trainings "
        "as the final set: evaluation/time_to_quality.{json,md,png}, accuracy against seconds of distillation, whose "
        "last point is the final row.",
    )

    def validate(self) -> None:
        for key, values, choices in (
            ("evaluate.modes", self.modes, tuple(EVALUATION_MODES)),
            ("evaluate.baseline_modes", self.baseline_modes, tuple(EVALUATION_MODES)),
            ("evaluate.train_sets", self.train_sets, BASELINE_TRAIN_SETS + tuple(DISTILL_METHODS)),
        ):
            for value in values:
                check_choice(key, value, choices)
        check_at_least_one(
            "evaluate", self, ("trials", "iterations", "max_iterations", "epochs", "validation_images", "batch_size")
        )
        if self.view_bank < 0:
            raise ConfigError(f"`evaluate.view_bank` must be >= 0 (0: fresh views every step), got {self.view_bank}.")
        check_positive("evaluate", self, ("lr", "projector_lr", "kd_temperature", "view_bank_max_mib"))
        check_choice("evaluate.protocol", self.protocol, EVALUATE_PROTOCOLS)
        if self.max_iterations < self.iterations:
            raise ConfigError(
                f"`evaluate.max_iterations` ({self.max_iterations}) must be >= `evaluate.iterations` ({self.iterations})."
            )
        if self.plateau_tolerance < 0:
            raise ConfigError(f"`evaluate.plateau_tolerance` must be >= 0, got {self.plateau_tolerance}.")
        check_choice("evaluate.projector", self.projector, ("sgd", "ridge"))
        if self.ridge_views < 1 or self.ridge_folds < 2:
            raise ConfigError(
                f"`evaluate.ridge_views` must be >= 1 and `evaluate.ridge_folds` >= 2, got {self.ridge_views} and "
                f"{self.ridge_folds}."
            )
        check_choice("evaluate.ridge_choice", self.ridge_choice, RIDGE_CHOICES)
        if not self.projector_anchors >= 0:  # also refuses NaN
            raise ConfigError(f"`evaluate.projector_anchors` must be >= 0 (0: no anchors), got {self.projector_anchors}.")
        if not self.fusion_weights or any(not 0 <= weight <= 1 for weight in self.fusion_weights):
            raise ConfigError(f"`evaluate.fusion_weights` needs values in [0, 1], got {self.fusion_weights}.")
        needs_validation = [what for what, used in (
            ("`evaluate.ridge_choice: validation`", self.ridge_choice == "validation"),
            ("mode fused", "fused" in self.modes + self.baseline_modes)) if used]
        if needs_validation and self.protocol != "converge":
            raise ConfigError(
                f"{needs_validation[0]} chooses on the validation slice of real train features, which only protocol "
                f"converge loads; got protocol {self.protocol!r}."
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

