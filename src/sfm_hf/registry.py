"""The distillation methods (Stage II) and evaluation modes (Stage III), each one object registered here.

Config validation, ``--help``, the Hub check, the result tables and the training code all read these
tables, so adding a method is one :class:`DistillMethod` here plus its per-step loss in
:mod:`sfm_hf.distill.losses`; adding a mode is one :class:`EvaluationMode` here plus its training in
:mod:`sfm_hf.evaluation.trainers`. This module imports nothing heavy (``--help`` reads it): the code of a
method or mode is named ``"module:function"`` and imported when a run uses it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


def load_function(path: str) -> Callable:
    """The function a ``"module:function"`` path names."""
    module, function = path.split(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class DistillMethod:
    """A way of optimising the synthetic images (``distill.method``); its images are the train set of its name."""

    name: str
    label: str  # what tables and plots call its synthetic set
    summary: str  # for --help
    # (DistillContext, images, step) -> the loss of this process's images at ``step`` (the same on every process).
    loss: str
    # It reads a batch of real train images every step (and so needs the dataset, not only the statistics).
    reads_real_images: bool = False
    # alpha of the decoupled centre loss when `distill.decoupled_alpha` is null (the TCDD / NCDD ablations).
    decoupled_alpha: float | None = None

    def loss_function(self) -> Callable:
        return load_function(self.loss)


# In the order of the paper's tables: the baseline before SFM's ablations before SFM.
DISTILL_METHODS = {method.name: method for method in (
    DistillMethod("lgm", "LGM", "the baseline: linear-head gradient matching on real batches",
                  "sfm_hf.distill.losses:lgm_step_loss", reads_real_images=True),
    DistillMethod("tcdd", "TCDD", "Tab. 3 ablation: target centres only",
                  "sfm_hf.distill.losses:decoupled_step_loss", decoupled_alpha=1.0),
    DistillMethod("ncdd", "NCDD", "Tab. 3 ablation: non-target centres only",
                  "sfm_hf.distill.losses:decoupled_step_loss", decoupled_alpha=0.0),
    DistillMethod("sfm", "SFM", "Eq. 9", "sfm_hf.distill.losses:sfm_step_loss"),
)}


@dataclass(frozen=True)
class EvaluationMode:
    """A way of training a classifier on a train set's images (``evaluate.modes``), scored on the eval split."""

    name: str
    # Its row in the strategy table (Table 5 / Fig. 3); {alpha} is filled for a per-alpha mode.
    label: str
    summary: str  # for --help
    # (TrialSetup, EvaluationMode, alpha) -> TrainedModel: how a model of this mode is trained.
    train: str
    trains_head: bool = True  # evaluate.lr applies
    trains_projector: bool = False  # evaluate.projector_lr applies
    # Its projector is fitted alone first (Eq. 10), by `evaluate.projector`: Adam (sgd) or one closed-form solve (ridge).
    fits_projector_alone: bool = False
    inherits_golden_head: bool = False  # its head starts as the golden classifier (IP)
    # Its rows in Table 2/4: the train set's label + this suffix ('SFM+CI'); None: only in the strategy table.
    main_table_suffix: str | None = None
    # Run once per `evaluate.kd_alphas` value and recorded as '<name>-<alpha>'.
    per_alpha: bool = False
    # Its projector of trial 0 on the run's own synthetic set is saved and is the one the exported model bundle holds.
    bundles_projector: bool = False
    curve_style: str = ":"  # matplotlib line style of its accuracy-vs-iteration curve
    # The modes whose trained models of the same trial it combines (and reuses when they were trained already).
    combines: tuple[str, ...] = ()
    # It predicts through the frozen golden classifier on P(phi_e(x)). On the distillation backbone (phi_e = phi_d)
    # the projector's optimum is the identity whatever the images, so such a row returns about the golden classifier
    # and cannot tell image sets apart: its results are marked as same-network there.
    predicts_through_golden: bool = False

    def train_function(self) -> Callable:
        return load_function(self.train)

    def variants(self, alphas: list[float]) -> list[str]:
        """The modes as recorded in results.json: this one, or one per alpha."""
        return [f"{self.name}-{alpha:g}" for alpha in alphas] if self.per_alpha else [self.name]


# In the order of the strategy table.
EVALUATION_MODES = {mode.name: mode for mode in (
    EvaluationMode("vanilla", "Vanilla", "linear head", "sfm_hf.evaluation.trainers:train_head", main_table_suffix="",
                   curve_style="-"),
    EvaluationMode("jt", "JT (w/o IP)", "projector and head trained jointly, head random",
                   "sfm_hf.evaluation.trainers:train_joint", trains_projector=True),
    EvaluationMode("jt_ip", "JT (w/ IP)", "jointly, head inherited from the golden classifier",
                   "sfm_hf.evaluation.trainers:train_joint", trains_projector=True, inherits_golden_head=True),
    EvaluationMode("st", "ST (w/o IP)", "projector first, then a random head",
                   "sfm_hf.evaluation.trainers:train_sequential", trains_projector=True, fits_projector_alone=True),
    EvaluationMode("st_ip", "ST (w/ IP)", "projector first, then the inherited head",
                   "sfm_hf.evaluation.trainers:train_sequential", trains_projector=True, fits_projector_alone=True,
                   inherits_golden_head=True),
    EvaluationMode("ci", "Our CI", "classifier inheritance, Eq. 10-11", "sfm_hf.evaluation.trainers:train_projector",
                   trains_head=False, trains_projector=True, fits_projector_alone=True, main_table_suffix="+CI",
                   bundles_projector=True, curve_style="--", predicts_through_golden=True),
    # Needs vanilla and ci of the same trial: planned after them, it reuses their trained models.
    EvaluationMode("fused", "Fused (vanilla + CI)", "vanilla head and CI log-probabilities mixed, the weight chosen "
                   "on real train features (fusion_weights; needs real_eval_data)",
                   "sfm_hf.evaluation.trainers:train_fused", trains_projector=True, fits_projector_alone=True,
                   main_table_suffix="+fused", combines=("vanilla", "ci"), curve_style="-.",
                   predicts_through_golden=True),
    EvaluationMode("kd", "Soft labels (α={alpha})", "soft labels of the golden classifier, once per kd_alphas value",
                   "sfm_hf.evaluation.trainers:train_head", per_alpha=True),
)}


def bundle_projector_mode() -> EvaluationMode:
    """The mode whose trained projector the exported model bundle holds."""
    (mode,) = (mode for mode in EVALUATION_MODES.values() if mode.bundles_projector)
    return mode


def parse_mode(recorded: str) -> tuple[EvaluationMode | None, float | None]:
    """A recorded mode ('kd-0.5', 'ci') -> (its EvaluationMode, its alpha); (None, None) for a reference row."""
    name, _, alpha = recorded.partition("-")
    mode = EVALUATION_MODES.get(name)
    if mode is None or mode.per_alpha != bool(alpha):
        return None, None
    try:
        return mode, float(alpha) if alpha else None
    except ValueError:
        return None, None
