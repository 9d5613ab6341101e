"""The whole configuration of a run (``Config``): the top-level keys, their sections, the checks across them."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..layout import RunLayout
from ..registry import DISTILL_METHODS
from .evaluation_options import EvaluateOptions
from .hub_options import HubOptions
from .options import (
    REAL_STARTS, AugmentOptions, ConfigError, DataOptions, DistillOptions, GoldenOptions, StatisticsOptions,
    check_choice, option,
)


STAGES = ("statistics", "distill", "evaluate", "export")
# Every seed of a run reaches numpy's global generator (accelerate's set_seed), which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


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
    augment: AugmentOptions = option(
        help="The differentiable augmentation of Stage II's and Stage III's views.", factory=AugmentOptions
    )
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
        if self.is_joint:
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
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"`seed` must be an integer from 0 to 2**32 - 1 = {MAX_SEED} (numpy's seed range), got {self.seed}.")
        if self.eval_split == self.train_split:
            raise ConfigError(
                f"`eval_split` and `train_split` are both {self.train_split!r}: accuracy on the images the statistics, "
                "the golden classifier and the baselines were made from says nothing about new images. Give a held-out "
                "split as `eval_split` (e.g. test or validation)."
            )
        self._validate_trackers()
        check_choice("progress", self.progress, ("auto", "bar", "lines", "off"))
        for section in (self.data, self.statistics, self.golden, self.augment, self.distill, self.evaluate, self.hub):
            section.validate()
        self._check_synthetic_sets_reachable()

    def _validate_trackers(self) -> None:
        if not self.trackers:
            return
        from accelerate.utils import LoggerType

        unknown = [name for name in self.trackers if name not in LoggerType.list()]
        if unknown:
            raise ConfigError(f"Unknown tracker(s) {unknown} in `trackers`; accelerate knows {LoggerType.list()}.")

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

    @property
    def is_joint(self) -> bool:
        """One synthetic set for several backbones (``backbone: [A, B, ...]``), run by :mod:`sfm_hf.multi`."""
        return isinstance(self.backbone, list)

    def member(self, backbone: str) -> Config:
        """The single-backbone config of one member: its own folder, its backbone, evaluated on it by default."""
        member = copy.deepcopy(self)
        member.backbone = backbone
        member.output_dir = str(RunLayout(self.output_dir).member_dir(backbone))
        member.eval_backbones = list(self.eval_backbones) or [backbone]
        return member

    def members(self) -> list[Config]:
        """The single-backbone configs a run's statistics belong to: every member's, or the run's own."""
        return [self.member(name) for name in self.backbones] if self.is_joint else [self]

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
        from ..utils import write_text_atomically

        write_text_atomically(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

