"""The option sections of reading data, Stage I and Stage II, and the helpers every section validates with."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..registry import DISTILL_METHODS


NORMALIZATIONS = ("backbone", "imagenet")
DISTILL_INITS = ("auto", "noise", "centroids", "nearest", "centroids_noise", "random")
# Starts that must read train images (auto falls back to noise where it cannot).
REAL_STARTS = ("centroids", "nearest", "centroids_noise", "random")


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
        check_at_least_one("data", self, ("batch_size",))
        if self.num_workers < 0:
            raise ConfigError(f"`data.num_workers` must be >= 0 (0 decodes in the main process), got {self.num_workers}.")
        if self.max_samples_per_split is not None and self.max_samples_per_split < 1:
            raise ConfigError(
                f"`data.max_samples_per_split` must be >= 1 (or null to read everything), got {self.max_samples_per_split}."
            )
        check_choice("data.normalization", self.normalization, NORMALIZATIONS)
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
        check_choice("statistics.non_target", self.non_target, ("class_mean", "sample"))


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
        check_choice("golden.recipe", self.recipe, GOLDEN_RECIPES)
        if not self.l2_grid or any(l2 < 0 for l2 in self.l2_grid):
            raise ConfigError(f"`golden.l2_grid` must hold L2 strengths >= 0, got {self.l2_grid}.")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"`golden.validation_fraction` must be in (0, 1), got {self.validation_fraction}.")
        check_at_least_one("golden", self, ("epochs", "batch_size", "max_iterations"))
        check_positive("golden", self, ("lr",))


@dataclass
class AugmentOptions:
    flip: bool = option(
        True,
        "Flip half of the augmented views horizontally: Stage II's views (of the synthetic images, and of LGM's real "
        "batches) and Stage III's training views alike. Turn it off where a mirror image is another class (digits, "
        "text): the digit recipes do.",
    )
    crop_scale: list[float] = option(
        help="Range [low, high] of the random-resized crop's area as a fraction of the image, sampled uniformly, for "
        "Stage II's and Stage III's views alike; [1, 1] keeps the whole frame (the aspect ratio still varies in "
        "[3/4, 4/3]). Default [0.08, 1]: the paper's and torchvision's.",
        factory=lambda: [0.08, 1.0],
    )

    def validate(self) -> None:
        scale = self.crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ConfigError(
                f"`augment.crop_scale` must be two fractions of the image area [low, high] with 0 < low <= high <= 1 "
                f"(e.g. [0.08, 1]), got {scale}."
            )


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
        "centres of each class's phi_d features, k = ipc: the class mean for ipc 1), nearest (the ipc real train "
        "images nearest to the class mean mu_c: the same image as centroids at ipc 1), centroids_noise (the "
        "centroids images blended with uniform noise, weight init_noise), random (ipc random train images per "
        "class) or auto: centroids where Stage I's feature cache of a non-streamed train split is at hand, noise "
        "otherwise (streamed Hub data, statistics_from). Real starts are decoded exactly at step 0. auto is the "
        "default because centroids beat noise and random on validation for both ImageNet CNNs at ipc 1 and 10 in "
        "the real-data benchmark, and nearest, centroids_noise and noise with the paper's 5000 steps where those "
        "were tried (docs/studies.md, The start of the synthetic images).",
    )
    init_noise: float = option(
        0.5, "centroids_noise: weight w of the noise in (1 - w) * centroid image + w * uniform noise, in [0, 1]."
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
    noise_p: float = option(
        0.5,
        "Probability that a Stage II view receives Gaussian noise (the paper's 0.5). On the MNIST CNN recipes the "
        "noisy views let the images drift off the real features over longer schedules (validation fell from 58.8 to "
        "45.6 % between 300 and 1000 steps on MobileNetV2); they set 0.",
    )
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
    mean_spread_weight: float = option(
        0.0,
        "sfm: weight lambda of a term added to Eq. 9 that keeps the synthetic class centres where the real ones lie: "
        "lambda * [C ||mean(m) - mean(mu*)||^2 / S + (||m - mean(m)|| / sqrt(S) - 1)^2], S = ||mu* - mean(mu*)||^2 "
        "(objectives.mean_spread_loss). Eq. 9's cosine sees only the direction of the centred class centres, so "
        "on a backbone without a final LayerNorm the features can drift off the real ones unseen. 0 (default): the "
        "paper's loss, which the paper-reproduction recipes set explicitly; measured on CNNs only, so the default "
        "stays the paper's: the MNIST CNN recipes (MobileNetV2, EfficientNet-Lite0) set 0.3, with which a 1000-step "
        "run from centroids kept improving to its end on validation, where the paper's loss peaked near 300 steps.",
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
    snapshot_every: int = option(
        0,
        "Save the current images to synthetic/snapshots/ every this many steps, at step 0 and at the last step, with "
        "the seconds of distillation so far (snapshot writing not counted); evaluate.time_to_quality scores them. "
        "Local only (never exported). 0: no snapshots.",
    )

    def validate(self) -> None:
        check_choice("distill.method", self.method, tuple(DISTILL_METHODS))
        check_choice("distill.representation", self.representation, ("pyramid", "pixel"))
        check_choice("distill.init", self.init, DISTILL_INITS)
        check_choice("distill.lgm_w_mode", self.lgm_w_mode, ("random", "fixed", "analytic"))
        check_choice("distill.mixed_precision", self.mixed_precision, ("no", "bf16"))
        check_at_least_one("distill", self, ("iterations", "pyramid_every", "aug_rounds", "log_every"))
        if self.syn_res != "auto" and (not isinstance(self.syn_res, int) or self.syn_res < 1):
            raise ConfigError(f"`distill.syn_res` must be auto or an integer >= 1, got {self.syn_res!r}.")
        if self.mean_spread_weight < 0:
            raise ConfigError(f"`distill.mean_spread_weight` must be >= 0 (0: the paper's loss), got "
                              f"{self.mean_spread_weight}.")
        if self.decoupled_alpha is not None and not 0 <= self.decoupled_alpha <= 1:
            raise ConfigError(f"`distill.decoupled_alpha` must lie in [0, 1], got {self.decoupled_alpha}.")
        check_positive("distill", self, ("lr",))
        if not 0 <= self.init_noise <= 1:
            raise ConfigError(f"`distill.init_noise` must lie in [0, 1], got {self.init_noise}.")
        if self.snapshot_every < 0:
            raise ConfigError(f"`distill.snapshot_every` must be >= 0 (0 disables), got {self.snapshot_every}.")
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


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.")


def check_at_least_one(section: str, options: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value < 1:
            raise ConfigError(f"`{section}.{name}` must be >= 1, got {value}.")


def check_positive(section: str, options: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value <= 0:
            raise ConfigError(f"`{section}.{name}` must be > 0, got {value}.")

