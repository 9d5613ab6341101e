"""Typed configuration: dataclasses filled from a YAML recipe plus command-line overrides.

Every key a recipe may contain is a field below with a ``help`` text; ``--help`` on the
command line prints them all. Overrides use dotted paths: ``--ipc 2``,
``--distill.iterations 50``, ``--stages statistics,distill``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

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
    max_samples_per_split: int | None = option(
        None, "Read at most this many examples of each split (quick trials); null reads everything."
    )


@dataclass
class StatisticsOptions:
    non_target: str = option(
        "class_mean",
        "Non-target centre used for the statistical flow: 'class_mean' = mean of the other class means (authors' "
        "code, default) or 'sample' = mean of all real samples outside the class (the paper's Eq. 7 derivation). "
        "They agree on balanced data.",
    )


@dataclass
class GoldenOptions:
    epochs: int = option(10, "Epochs of the golden linear classifier over the cached train features (authors: 10).")
    lr: float = option(1e-3, "Adam learning rate of the golden classifier (cosine schedule).")
    batch_size: int = option(128, "Mini-batch size for the golden classifier.")
    weight_decay: float = option(0.0, "Weight decay of the golden classifier.")


@dataclass
class DistillOptions:
    method: str = option("sfm", "Objective: sfm (Eq. 9), tcdd / ncdd (Tab. 3 ablations) or lgm (the baseline).")
    iterations: int = option(5000, "Optimisation steps.")
    lr: float = option(0.002, "Adam learning rate on the image parameters.")
    representation: str = option("pyramid", "Image parameterisation: pyramid (authors) or pixel.")
    syn_res: int = option(256, "Side of the synthetic images in pixels (the pyramid's finest level).")
    pyramid_every: int = option(200, "Add a pyramid level every this many steps.")
    decorrelate: bool = option(True, "Apply the Lucid colour decorrelation when decoding the pyramid.")
    reset_optimizer_on_growth: bool = option(
        True, "Re-create Adam (its moments are lost) when the pyramid grows, as the authors do."
    )
    aug_rounds: int = option(1, "Augmented copies of every synthetic image per step (SFM: 1; LGM: 10).")
    noise_std: float = option(0.2, "Std of the Gaussian noise augmentation.")
    noise_p: float = option(0.5, "Probability that an augmented view receives Gaussian noise.")
    noise_mean: float = option(0.0, "Mean of the Gaussian noise (0.5 in the older LGM code).")
    lgm_w_mode: str = option(
        "random", "LGM head: random (new W ~ N(0, 0.01^2) every step), fixed (one W per run), analytic (softmax -> 1/C)."
    )
    mixed_precision: str = option("no", "Autocast for the backbone forward: no or bf16 (no loss scaling needed).")
    compile: bool = option(False, "torch.compile the backbone forward.")
    checkpoint_every: int = option(500, "Write a resumable checkpoint every this many steps (0 disables).")
    preview_every: int = option(0, "Write preview.png of the current images every this many steps (0: only at the end).")
    log_every: int = option(50, "Report the loss to the progress bar and trackers every this many steps.")


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
    backbone: str = option("", "Distillation backbone phi_d: Hub id, local folder, or open_clip 'hf-hub:'/'local-dir:' id.")
    eval_backbones: list[str] = option(
        help="Evaluation backbones phi_e; empty means the distillation backbone only.", factory=list
    )
    ipc: int = option(1, "Synthetic images per class.")
    output_dir: str = option("outputs/run", "Folder for every output of the run; stages read earlier stages from here.")
    stages: list[str] = option(help=f"Stages to run, in this order: {', '.join(STAGES)}.", factory=lambda: list(STAGES[:2]))
    seed: int = option(0, "Seed for every random choice of the run.")
    data: DataOptions = option(help="Reading real images.", factory=DataOptions)
    statistics: StatisticsOptions = option(help="Stage I: class statistics.", factory=StatisticsOptions)
    golden: GoldenOptions = option(help="Stage I: the golden classifier.", factory=GoldenOptions)
    distill: DistillOptions = option(help="Stage II: distillation.", factory=DistillOptions)

    def validate(self) -> None:
        if not self.dataset:
            raise ConfigError("`dataset` is empty: give a Hub id or a local folder.")
        if not self.backbone:
            raise ConfigError("`backbone` is empty: give a Hub id or a local model folder.")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"Unknown stage(s) {unknown}; valid stages are {list(STAGES)}.")
        if not self.stages:
            raise ConfigError("`stages` is empty; nothing to run.")
        if self.ipc < 1:
            raise ConfigError(f"`ipc` must be >= 1, got {self.ipc}.")
        _check_choice("statistics.non_target", self.statistics.non_target, ("class_mean", "sample"))
        _check_choice("distill.method", self.distill.method, ("sfm", "tcdd", "ncdd", "lgm"))
        _check_choice("distill.representation", self.distill.representation, ("pyramid", "pixel"))
        _check_choice("distill.lgm_w_mode", self.distill.lgm_w_mode, ("random", "fixed", "analytic"))
        _check_choice("distill.mixed_precision", self.distill.mixed_precision, ("no", "bf16"))
        for key, value in (
            ("data.batch_size", self.data.batch_size),
            ("golden.epochs", self.golden.epochs),
            ("golden.batch_size", self.golden.batch_size),
            ("distill.iterations", self.distill.iterations),
            ("distill.syn_res", self.distill.syn_res),
            ("distill.pyramid_every", self.distill.pyramid_every),
            ("distill.aug_rounds", self.distill.aug_rounds),
            ("distill.log_every", self.distill.log_every),
        ):
            if value < 1:
                raise ConfigError(f"`{key}` must be >= 1, got {value}.")
        if not 0 < self.data.crop_ratio <= 1:
            raise ConfigError(f"`data.crop_ratio` must be in (0, 1], got {self.data.crop_ratio}.")

    @property
    def evaluation_backbones(self) -> list[str]:
        return self.eval_backbones or [self.backbone]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}.")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` (already YAML-parsed) against a field's type, converting the few safe cases."""
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"`{key}` expects a number, got {value!r}.")
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


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config PATH`` from ``--key value`` / ``--key=value`` overrides (values parsed as YAML)."""
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
        else:
            if position + 1 >= len(argv):
                raise ConfigError(f"Option {token} needs a value.")
            key, raw = token[2:], argv[position + 1]
            position += 2
        if key == "config":
            recipe = raw
        else:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
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
