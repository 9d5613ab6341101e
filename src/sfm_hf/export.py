"""The export stage: three Hub-layout folders in ``<output_dir>``, and publishing them (``hub.push``).

``synthetic/`` -- the dataset repo. Stage II's own files stay at its root for the local stages
(``images.safetensors``, ``synthetic.json``, ``preview.png``; not uploaded). Export adds one
folder per named config, ``data/<config>/``: ``train-00000-of-00001.parquet`` (``image``: PNG
bytes of the 8-bit quantised images, lossless; ``label``: ClassLabel with the real class
names), the exact float images (``images.safetensors``), ``synthetic.json``, ``results.json``
(this variant's Stage III rows), ``preview.png`` and ``config.yaml`` (the run's config); and the
card ``README.md``, whose YAML lists every config (this run's is the default). Per-config folders
let runs with other backbones or ipc push into one repo without overwriting each other.

``model/`` -- :class:`~sfm_hf.modeling_sfm.SFMForImageClassification` saved with its remote
code, the evaluation backbone's image processor, ``config.yaml`` and a card with model-index results.

``statistics/`` -- Stage I's folder gains a card and ``config.yaml``; its feature cache
(``features/``) is never uploaded.

Publishing makes one commit per repo. Local paths never leave the machine: published text names a
local input by its folder name (:class:`PathRedactor`), a Hub input by its id.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from accelerate.logging import get_logger

from .backbones import FrozenBackbone, load_backbone
from .config import Config
from .errors import StageInputError, UserError
from .hub import statistics_dir
from .names import OPEN_CLIP_PREFIXES, is_hub_id, public_name, slug
from .layout import (
    CARD_FILE, CONFIG_FILE, FEATURES_DIR, GOLDEN_JSON, GOLDEN_TENSORS, IMAGES_FILE, PREVIEW_FILE,
    RESULTS_FILE, STATISTICS_JSON, STATISTICS_TENSORS, SYNTHETIC_JSON, VARIANTS_DIR, RunLayout,
)
from .statistics import golden_classifier_file

logger = get_logger(__name__)

PARQUET_NAME = "train-00000-of-00001.parquet"
# Stage II's working copies at the root of synthetic/: the Hub gets them per config under data/<config>/.
SYNTHETIC_LOCAL_ONLY = [IMAGES_FILE, SYNTHETIC_JSON, PREVIEW_FILE, "*.tmp", "*.tmp.png"]
STATISTICS_LOCAL_ONLY = [f"{FEATURES_DIR}/*", "*.tmp"]
PAPER = "Statistical Flow Matching (SFM) with classifier inheritance (CI)"


class ExportError(UserError):
    """Something the export needs is missing or inconsistent; the message says what to run or change."""


class PublishError(UserError):
    """An upload failed; the local folders are intact and the message says what to re-run."""


# ---------------------------------------------------------------------------------------------
# Names


@dataclass
class RepoNames:
    """Hub repo ids (and the dataset config name) this run exports to."""

    dataset: str
    dataset_config: str
    model: str
    statistics: str


def repo_names(config: Config, source_dataset: str) -> RepoNames:
    """Fill the ``hub.*`` templates; without ``hub.org`` the ids carry a 'your-org' placeholder (local export only)."""
    hub = config.hub
    values = {
        "org": hub.org or "your-org",
        "dataset": hub.dataset_name or slug(source_dataset),
        # A joint set (several backbones) is its own dataset config, `multi` unless hub.backbone_name says otherwise.
        "backbone": hub.backbone_name or ("multi" if config.is_joint else slug(config.backbone)),
        "eval_backbone": slug(bundle_backbone(config)),
        "ipc": config.ipc,
        "method": config.distill.method,
    }
    names = RepoNames(
        dataset=hub.dataset_repo.format(**values),
        dataset_config=hub.dataset_config_name.format(**values),
        model=hub.model_repo.format(**values),
        statistics=hub.statistics_repo.format(**values),
    )
    from huggingface_hub.utils import validate_repo_id

    for key in ("dataset", "model", "statistics"):
        repo_id = getattr(names, key)
        try:
            validate_repo_id(repo_id)
        except ValueError as error:
            raise ExportError(f"`hub.{key}_repo` gives {repo_id!r}, which is not a valid Hub repo id: {error}") from None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", names.dataset_config):
        raise ExportError(
            f"`hub.dataset_config_name` gives {names.dataset_config!r}: use letters, digits, '.', '_' and '-'."
        )
    return names


def bundle_backbone(config: Config) -> str:
    """The evaluation backbone held by the model bundle."""
    return config.hub.eval_backbone or config.evaluation_backbones[0]


class PathRedactor:
    """Replaces the run's local input and output paths by their public names in text that will be published."""

    def __init__(self, config: Config, *extra: str):
        names = [config.dataset, *config.backbones, *config.eval_backbones, config.hub.eval_backbone or "",
                 config.statistics_from or "", config.output_dir, *config.evaluate.extra_synthetic,
                 *config.hub.include_runs, *extra]
        replacements = {}
        for name in names:
            local = name.removeprefix("local-dir:")
            if not local or local.startswith("hf-hub:") or is_hub_id(local):
                continue
            for spelling in {local, local.rstrip("/"), str(Path(local).expanduser().resolve())}:
                if Path(spelling).name and Path(spelling).name != spelling:
                    replacements[spelling] = Path(spelling).name
        # Longest first: a folder inside another must not be cut at its parent's name.
        self.replacements = sorted(replacements.items(), key=lambda item: -len(item[0]))

    def __call__(self, text: str) -> str:
        for local, public in self.replacements:
            text = text.replace(local, public)
        return text


def public_config_yaml(config: Config, redact: PathRedactor) -> str:
    """The resolved config of the run as published beside every repo: enough to reproduce it from the Hub.

    The config holds no credentials (the token lives with huggingface_hub); local paths become base names.
    """
    import yaml

    header = "# The sfm-hf config that made this repo (local paths shortened to their folder names).\n"
    return header + redact(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# What the earlier stages left


@dataclass
class RunFacts:
    """Everything the export reads from the earlier stages' files."""

    config: Config
    output_dir: Path
    statistics_dir: Path
    statistics: dict[str, Any]
    golden: dict[str, Any] | None
    synthetic: dict[str, Any]
    results: list[dict[str, Any]]
    redact: PathRedactor

    @property
    def source_dataset(self) -> str:
        return self.config.dataset or self.statistics.get("dataset") or ""

    @property
    def class_names(self) -> list[str]:
        return list(self.statistics["class_names"])

    def variant_results(self) -> list[dict[str, Any]]:
        """Stage III rows about this run's synthetic set or its real baselines at this ipc."""
        return [
            record for record in self.results
            if record.get("distill_backbone") in self.config.backbones and record.get("ipc") in (None, self.config.ipc)
        ]


def read_results(output_dir: Path) -> list[dict[str, Any]]:
    path = RunLayout(output_dir).results_file
    if not path.is_file():
        return []
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ExportError(f"{path} should hold a JSON list of result records, got {type(records).__name__}.")
    return records


def gather_facts(config: Config) -> RunFacts:
    output_dir = Path(config.output_dir)
    synthetic_dir = RunLayout(output_dir).synthetic_dir
    synthetic_json = synthetic_dir / SYNTHETIC_JSON
    if not synthetic_json.is_file() or not (synthetic_dir / IMAGES_FILE).is_file():
        raise StageInputError(
            f"Stage 'export' needs {synthetic_dir}/{IMAGES_FILE} and {SYNTHETIC_JSON}: run the "
            "'distill' stage first (add it to --stages)."
        )
    # A joint set's members share the classes; the first member's statistics describe the dataset.
    stats_dir = statistics_dir(config.members()[0])
    if not (stats_dir / STATISTICS_JSON).is_file():
        raise StageInputError(f"Stage 'export' needs {stats_dir}/{STATISTICS_JSON}: run the 'statistics' stage first.")
    golden_json = stats_dir / GOLDEN_JSON
    statistics = json.loads((stats_dir / STATISTICS_JSON).read_text())
    return RunFacts(
        config=config,
        output_dir=output_dir,
        statistics_dir=stats_dir,
        statistics=statistics,
        golden=json.loads(golden_json.read_text()) if golden_json.is_file() else None,
        synthetic=json.loads(synthetic_json.read_text()),
        results=read_results(output_dir),
        redact=PathRedactor(config, statistics.get("dataset") or ""),
    )


def source_license(dataset: str) -> str | None:
    """The license field of the source dataset's card, when a local or cached card says it."""
    from huggingface_hub import DatasetCard

    if not dataset:
        return None
    card_path = Path(dataset) / "README.md"
    if not card_path.is_file():
        if not is_hub_id(dataset):
            return None
        try:
            from huggingface_hub import hf_hub_download

            card_path = Path(hf_hub_download(dataset, "README.md", repo_type="dataset"))
        except Exception:  # noqa: BLE001 -- no card (offline, none published) just means no license field
            return None
    try:
        license_value = DatasetCard.load(card_path).data.get("license")
    except Exception:  # noqa: BLE001 -- an unreadable card is treated like a missing one
        return None
    return license_value if isinstance(license_value, str) else None


# ---------------------------------------------------------------------------------------------
# Cards


def render(template: str, **values: Any) -> str:
    """Fill a card template shipped in ``sfm_hf/templates/`` (Jinja2; undefined names are errors)."""
    import jinja2

    # Package data, read through the import system: works from a wheel as from a checkout.
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("sfm_hf", "templates"), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
    )
    environment.filters["percent"] = _percent
    environment.filters["size"] = human_size
    return environment.get_template(template).render(**values)


def make_card(card_class, template: str, card_data, redact: PathRedactor, **values: Any):
    """A huggingface_hub card (ModelCard / DatasetCard) from one of our templates; the metadata is ``card_data``."""
    return card_class(redact(render(template, card_data=card_data.to_yaml(), **values)))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def human_size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} GB"


def size_category(count: int) -> str:
    """The Hub's size_categories bucket of a dataset with ``count`` examples."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if count < limit:
            return label
    return "1M<n<10M"


def _result_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "train_set": record.get("train_set"),
            "eval_backbone": record.get("eval_backbone"),
            "mode": record.get("mode"),
            "mean": record.get("mean"),
            "std": record.get("std"),
            "trials": record.get("trials"),
            "projector_accuracy": record.get("projector_accuracy"),
        }
        for record in records
    ]


# ---------------------------------------------------------------------------------------------
# synthetic/ -- the dataset


@dataclass
class DatasetVariant:
    """One named config of the dataset folder, as read back from its files."""

    name: str
    info: Any  # datasets.DatasetInfo
    parquet_bytes: int
    float_bytes: int | None = None
    synthetic: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return self.info.splits["train"].num_examples


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 [N, H, W, 3] by round(255 x), the PNG content."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def png_bytes(pixels: torch.Tensor) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (no second copy of the float images), else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_variant(folder: Path, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                  source: Path, results: list[dict[str, Any]], facts: RunFacts) -> Path:
    """``folder`` = synthetic/data/<config>/: the parquet split, the exact float images, what made them."""
    import datasets

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    pixels = quantise(images)
    rows = {"image": [{"bytes": png_bytes(image), "path": None} for image in pixels], "label": labels.tolist()}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / PARQUET_NAME))
    _link_or_copy(source / IMAGES_FILE, folder / IMAGES_FILE)
    (folder / SYNTHETIC_JSON).write_text(facts.redact((source / SYNTHETIC_JSON).read_text()))
    if (source / PREVIEW_FILE).is_file():
        shutil.copy2(source / PREVIEW_FILE, folder / PREVIEW_FILE)
    (folder / RESULTS_FILE).write_text(facts.redact(json.dumps(results, indent=2)))
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.config, facts.redact))
    return folder


def read_variant(folder: Path) -> DatasetVariant:
    """Describe data/<config>/ from its files: features and split sizes as the Hub card needs them."""
    import datasets
    import pyarrow.parquet as pq

    parquet = folder / PARQUET_NAME
    table = pq.read_table(parquet)
    features = datasets.Features.from_arrow_schema(table.schema)
    num_bytes = int(table.nbytes)
    parquet_bytes = parquet.stat().st_size
    info = datasets.DatasetInfo(
        features=features,
        splits=datasets.SplitDict({"train": datasets.SplitInfo(name="train", num_bytes=num_bytes,
                                                                 num_examples=table.num_rows)}),
        download_size=parquet_bytes,
        dataset_size=num_bytes,
        config_name=folder.name,
    )
    float_path = folder / IMAGES_FILE
    synthetic_path, results_path = folder / SYNTHETIC_JSON, folder / RESULTS_FILE
    return DatasetVariant(
        name=folder.name,
        info=info,
        parquet_bytes=parquet_bytes,
        float_bytes=float_path.stat().st_size if float_path.is_file() else None,
        synthetic=json.loads(synthetic_path.read_text()) if synthetic_path.is_file() else None,
        results=json.loads(results_path.read_text()) if results_path.is_file() else [],
    )


def _include_runs(config: Config, variants_root: Path, own: str) -> list[str]:
    """Copy the exported configs of ``hub.include_runs`` into this dataset folder; returns their names."""
    names = []
    for run in config.hub.include_runs:
        other_root = RunLayout(run).synthetic_dir / VARIANTS_DIR
        found = sorted(path for path in other_root.glob("*") if (path / PARQUET_NAME).is_file()) if other_root.is_dir() else []
        if not found:
            raise ExportError(
                f"`hub.include_runs` names {run!r}, which has no exported dataset config in {other_root}: run its "
                "'export' stage first."
            )
        for variant in found:
            if variant.name == own or variant.name in names:
                raise ExportError(
                    f"Config name {variant.name!r} comes from two runs ({run!r} and this one or another included "
                    "run): give them distinct names with `hub.dataset_config_name`, e.g. '{backbone}-ipc{ipc}'."
                )
            target = variants_root / variant.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(variant, target)
            names.append(variant.name)
    return names


def dataset_card(variants: list[DatasetVariant], facts: RunFacts, names: RepoNames, *,
                 license_name: str | None, hub_card_data=None):
    """The DatasetCard: YAML metadata (features, splits with sizes, configs) and the body from the template.

    ``hub_card_data``: the metadata of the card already on the Hub. Its configs and their sizes are kept:
    ``datasets`` merges ours into it (``MetadataConfigs`` / ``DatasetInfosDict``), as its ``push_to_hub`` does.
    """
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    card_data = hub_card_data if hub_card_data is not None else DatasetCardData()
    local = {variant.name for variant in variants}
    hub_configs = MetadataConfigs.from_dataset_card_data(card_data)
    hub_default = hub_configs.get_default_config_name() if hub_configs else None
    # A default that lives only on the Hub stays the default; otherwise this run's config is.
    default = hub_default if hub_default and hub_default not in local else names.dataset_config
    configs = MetadataConfigs({
        variant.name: {"data_files": [{"split": "train", "path": f"{VARIANTS_DIR}/{variant.name}/train-*.parquet"}]}
        for variant in variants
    })
    if default in hub_configs:
        configs[default] = {**hub_configs[default], "default": True}
    else:
        configs[default]["default"] = True
    for name, entry in hub_configs.items():
        if name != default and entry.get("default"):
            configs[name] = {key: value for key, value in entry.items() if key != "default"}
    configs.to_dataset_card_data(card_data)
    DatasetInfosDict({variant.name: variant.info for variant in variants}).to_dataset_card_data(card_data)
    infos = DatasetInfosDict.from_dataset_card_data(card_data)
    total = sum(split.num_examples for info in infos.values() for split in info.splits.values())

    source = facts.source_dataset
    card_data.license = license_name
    card_data.task_categories = ["image-classification"]
    card_data.size_categories = [size_category(total)]
    card_data.source_datasets = [source] if is_hub_id(source) else None
    card_data.pretty_name = f"SFM synthetic {slug(source)} (ipc {facts.config.ipc})"
    card_data.tags = ["dataset-distillation", "synthetic", "sfm", "statistical-flow-matching"]
    own = next(variant for variant in variants if variant.name == names.dataset_config)
    card_data["sfm"] = {
        "source_dataset": public_name(source),
        "backbone": [public_name(name) for name in facts.config.backbone] if facts.config.is_joint
        else public_name(facts.config.backbone),
        "method": own.synthetic.get("method") if own.synthetic else facts.config.distill.method,
        "ipc": facts.config.ipc,
        "iterations": own.synthetic.get("iterations") if own.synthetic else None,
        "seed": facts.config.seed,
    }
    return make_card(
        DatasetCard, "dataset_card.md.j2", card_data, facts.redact,
        repo_id=names.dataset,
        default=default,
        variants=variants,
        remote_only=[name for name in MetadataConfigs.from_dataset_card_data(card_data) if name not in local],
        source_name=slug(source),
        source_link=f"[{source}](https://huggingface.co/datasets/{source})" if is_hub_id(source) else f"`{public_name(source)}`",
        class_count=len(facts.class_names),
        model_repo=names.model,
        statistics_repo=names.statistics,
        rows=_result_rows,
    )


def export_dataset(facts: RunFacts, names: RepoNames, license_name: str | None) -> Path:
    """synthetic/: this run's config under data/<config>/, included runs' configs, and the card."""
    folder = RunLayout(facts.output_dir).synthetic_dir
    tensors = load_file(folder / IMAGES_FILE)
    images, labels = tensors["images"], tensors["labels"]
    variants_root = folder / VARIANTS_DIR
    write_variant(variants_root / names.dataset_config, images, labels, facts.class_names, folder,
                  facts.variant_results(), facts)
    included = _include_runs(facts.config, variants_root, names.dataset_config)
    keep = {names.dataset_config, *included}
    for stale in variants_root.iterdir():
        if stale.name in keep:
            continue
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    variants = [read_variant(variants_root / name) for name in [names.dataset_config, *included]]
    dataset_card(variants, facts, names, license_name=license_name).save(folder / CARD_FILE)
    return folder


# ---------------------------------------------------------------------------------------------
# model/ -- the classifier bundle


@dataclass
class Projector:
    """The projector the bundle holds, and the accuracy measured for exactly it with the golden classifier."""

    weight: torch.Tensor
    bias: torch.Tensor
    kind: str  # "trained" (Stage III, Eq. 10) or "identity" (phi_e == phi_d, no Stage III)
    accuracy: float | None
    source: str


def _ci_record(facts: RunFacts, eval_name: str) -> dict[str, Any] | None:
    """The latest Stage III classifier-inheritance row of this run's synthetic set through ``eval_name``."""
    matching = [
        record for record in facts.results
        if record.get("mode") == "ci" and record.get("train_set") == facts.config.distill.method
        and record.get("eval_backbone") == eval_name and record.get("distill_backbone") == facts.config.backbone
        and record.get("ipc") in (None, facts.config.ipc) and record.get("projector")
    ]
    return matching[-1] if matching else None


def choose_projector(facts: RunFacts, eval_name: str, distill_dim: int) -> Projector:
    record = _ci_record(facts, eval_name)
    if record is not None:
        path = facts.output_dir / record["projector"]
        if not path.is_file():
            raise ExportError(f"results.json names the projector {path}, which does not exist: run 'evaluate' again.")
        tensors = load_file(path)
        return Projector(tensors["weight"], tensors["bias"], "trained", record.get("projector_accuracy"),
                         f"Stage III trained this projector (mode ci, `{record['projector']}`) and scored it")
    if eval_name == facts.config.backbone:
        accuracy = facts.golden.get("eval_accuracy") if facts.golden else None
        return Projector(torch.eye(distill_dim), torch.zeros(distill_dim), "identity", accuracy,
                         "the projector is the identity (the encoder is the distillation backbone), so this is the "
                         "golden classifier's own accuracy from Stage I")
    raise ExportError(
        f"The model bundle for evaluation backbone {eval_name!r} needs the projector that the 'evaluate' stage "
        f"trains (mode ci on train set {facts.config.distill.method!r}), and {RunLayout(facts.output_dir).results_file} has "
        "none: run the 'evaluate' stage with `evaluate.modes` including ci, or set `hub.eval_backbone` to the "
        "distillation backbone."
    )


def stage_geometry(image_size: int, crop_ratio: float) -> dict[str, Any]:
    """Resize/crop settings of Stage I's real-image pipeline (data.resize_center_crop), as processor keys."""
    return {
        "size": {"shortest_edge": max(image_size, round(image_size / crop_ratio))},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
    }


def describe_geometry(values: dict[str, Any]) -> str:
    """'shorter side 256 px, centre crop 224x224' from an image processor's settings."""
    size = values.get("size") or {}
    if "shortest_edge" in size:
        text = f"shorter side {size['shortest_edge']} px"
    elif "height" in size and "width" in size:
        text = f"{size['height']}x{size['width']} px"
    else:
        text = f"size {size}"
    crop = values.get("crop_size") or {}
    if values.get("do_center_crop") and "height" in crop:
        text += f", centre crop {crop['height']}x{crop['width']}"
    return text


def save_image_processor(backbone: FrozenBackbone, crop_ratio: float, folder: Path) -> str:
    """The bundle's image processor (pipeline needs it); returns a description for the card.

    Always Stage I/III's own preprocessing, never the backbone's shipped processor: the card's
    accuracy was measured with this geometry (shorter side to size / crop_ratio, bicubic, centre
    crop) and the backbone's mean/std as the run used them (``data.normalization``), and another
    geometry scores something else (DINOv2's own: shorter side 256 for every crop_ratio).
    """
    from transformers import BitImageProcessor

    info = backbone.info
    BitImageProcessor(
        **stage_geometry(backbone.image_size, crop_ratio),
        do_resize=True,
        resample=3,  # PIL bicubic, as data.resize_center_crop
        do_rescale=True,
        do_normalize=True,
        image_mean=list(info.mean),
        image_std=list(info.std),
        do_convert_rgb=True,
    ).save_pretrained(folder)
    return "the preprocessing of Stage I and III (the geometry and mean/std the accuracy was measured with)"


def build_bundle(facts: RunFacts, eval_name: str, backbone: FrozenBackbone, projector: Projector,
                 golden: dict[str, torch.Tensor]):
    """The in-memory SFMForImageClassification holding phi_e, P and the golden classifier."""
    from .configuration_sfm import SFMConfig
    from .modeling_sfm import SFMForImageClassification

    vision_config = backbone.model.config
    # The loader records where it read the backbone from (a local path, perhaps); the bundle says it in backbone_id.
    vision_config.name_or_path = ""
    class_names = facts.class_names
    config = SFMConfig(
        vision_config=vision_config,
        feature_dim=backbone.feature_dim,
        distill_feature_dim=golden["weight"].shape[1],
        backbone_weights="embedded" if facts.config.hub.embed_backbone else "reference",
        # An embedded encoder needs no address, so a local folder is published by its name only; a referenced one
        # must stay loadable from where it is.
        backbone_id=eval_name if not facts.config.hub.embed_backbone else public_name(eval_name),
        distill_backbone=public_name(facts.config.backbone),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
    )
    model = SFMForImageClassification(config)
    # After post_init (inside the constructor), which would re-initialise anything loaded earlier.
    model.vision_model.load_state_dict(backbone.model.state_dict())
    model.projector.load_state_dict({"weight": projector.weight, "bias": projector.bias})
    model.classifier.load_state_dict(golden)
    return model.eval()


def bundle_parts(facts: RunFacts) -> tuple[str, FrozenBackbone, Projector, dict[str, torch.Tensor]]:
    """The eval backbone's name, the backbone, the projector and the golden classifier the bundle holds, checked."""
    config = facts.config
    eval_name = bundle_backbone(config)
    if eval_name.startswith(OPEN_CLIP_PREFIXES):
        raise ExportError(
            f"The evaluation backbone {eval_name!r} is an open_clip model, which the transformers bundle cannot "
            "hold: set `hub.eval_backbone` to a transformers backbone, or drop 'model' from `hub.folders`."
        )
    golden = load_file(golden_classifier_file(facts.statistics_dir))
    distill_dim = golden["weight"].shape[1]
    projector = choose_projector(facts, eval_name, distill_dim)
    backbone = load_backbone(eval_name, device="cpu", normalization=config.data.normalization)
    expected = (distill_dim, backbone.feature_dim)
    if tuple(projector.weight.shape) != expected:
        raise ExportError(
            f"The projector is {tuple(projector.weight.shape)} but {eval_name!r} gives {backbone.feature_dim}-d "
            f"features and the golden classifier reads {distill_dim}-d: results.json belongs to another run."
        )
    return eval_name, backbone, projector, golden


def save_bundle(model, backbone: FrozenBackbone, crop_ratio: float, folder: Path) -> str:
    """model/ afresh: weights, remote code, image processor; returns where the processor's settings come from."""
    from .configuration_sfm import SFMConfig
    from .modeling_sfm import SFMForImageClassification

    if folder.exists():
        shutil.rmtree(folder)
    SFMConfig.register_for_auto_class()
    SFMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    model.save_pretrained(folder)
    return save_image_processor(backbone, crop_ratio, folder)


@dataclass
class BundleFacts:
    """What the model card says about a saved bundle."""

    eval_name: str
    backbone: FrozenBackbone  # phi_e
    feature: str  # the encoder output used as phi_e(x)
    projector: Projector
    variant: DatasetVariant  # the synthetic images behind the projector
    processor_source: str
    measured_geometry: str  # how the eval images were resized for the accuracy the card reports
    head_parameters: int
    encoder_parameters: int
    encoder_bytes: int

    @classmethod
    def measure(cls, model, eval_name: str, backbone: FrozenBackbone, projector: Projector, variant: DatasetVariant,
                processor_source: str, crop_ratio: float) -> "BundleFacts":
        from .modeling_sfm import feature_output

        return cls(
            eval_name=eval_name, backbone=backbone, feature=feature_output(backbone.model.config.model_type),
            projector=projector, variant=variant, processor_source=processor_source,
            measured_geometry=describe_geometry(stage_geometry(backbone.image_size, crop_ratio)),
            head_parameters=sum(p.numel() for p in (*model.projector.parameters(), *model.classifier.parameters())),
            encoder_parameters=sum(p.numel() for p in model.vision_model.parameters()),
            encoder_bytes=sum(t.numel() * t.element_size() for t in model.vision_model.state_dict().values()),
        )


def export_model(facts: RunFacts, names: RepoNames, license_name: str | None, dataset_folder: Path) -> Path:
    """model/: the bundle with remote code, its image processor and card."""
    eval_name, backbone, projector, golden = bundle_parts(facts)
    model = build_bundle(facts, eval_name, backbone, projector, golden)
    folder = RunLayout(facts.output_dir).model_dir
    processor_source = save_bundle(model, backbone, facts.config.data.crop_ratio, folder)
    variant = read_variant(dataset_folder / VARIANTS_DIR / names.dataset_config)
    bundle = BundleFacts.measure(model, eval_name, backbone, projector, variant, processor_source,
                                 facts.config.data.crop_ratio)
    model_card(facts, names, license_name, bundle).save(folder / CARD_FILE)
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.config, facts.redact))
    return folder


def model_card(facts: RunFacts, names: RepoNames, license_name: str | None, bundle: BundleFacts):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = facts.config
    source = facts.source_dataset
    eval_split = facts.golden.get("eval_split", config.eval_split) if facts.golden else config.eval_split
    projector, eval_name = bundle.projector, bundle.eval_name
    eval_results = None
    if projector.accuracy is not None:
        eval_results = [EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=public_name(source), dataset_name=slug(source),
            dataset_split=eval_split, metric_type="accuracy", metric_name="Top-1 accuracy",
            metric_value=round(float(projector.accuracy), 6),
        )]
    datasets = [name for name in (source, names.dataset) if is_hub_id(name) and "your-org/" not in name]
    card_data = ModelCardData(
        base_model=eval_name if is_hub_id(eval_name) else None,
        datasets=datasets or None,
        license=license_name,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["sfm", "dataset-distillation", "classifier-inheritance", "custom_code"],
        model_name=names.model,
        eval_results=eval_results,
    )
    return make_card(
        ModelCard, "model_card.md.j2", card_data, facts.redact,
        repo_id=names.model,
        dataset_repo=names.dataset,
        dataset_config=names.dataset_config,
        statistics_repo=names.statistics,
        source=public_name(source),
        eval_name=public_name(eval_name),
        distill_name=public_name(config.backbone),
        same_backbone=eval_name == config.backbone,
        family=bundle.backbone.family,
        feature=bundle.feature,
        feature_dim=bundle.backbone.feature_dim,
        distill_dim=projector.weight.shape[0],
        num_classes=len(facts.class_names),
        projector=projector,
        eval_split=eval_split,
        embedded=config.hub.embed_backbone,
        processor_source=bundle.processor_source,
        measured_geometry=bundle.measured_geometry,
        variant=bundle.variant,
        ipc=config.ipc,
        resolution=facts.synthetic.get("resolution"),
        head_parameters=bundle.head_parameters,
        head_bytes=bundle.head_parameters * 4,
        encoder_parameters=bundle.encoder_parameters,
        encoder_bytes=bundle.encoder_bytes,
        golden=facts.golden,
        paper=PAPER,
    )


# ---------------------------------------------------------------------------------------------
# statistics/ -- Stage I outputs


def export_statistics(facts: RunFacts, names: RepoNames, license_name: str | None) -> Path | None:
    """Add a card to this run's statistics/ (not to a ``statistics_from`` source, which is someone else's)."""
    from huggingface_hub import ModelCard, ModelCardData

    if facts.config.statistics_from:
        return None
    folder = facts.statistics_dir
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.config, facts.redact))
    tensors = load_file(folder / STATISTICS_TENSORS)
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in folder.iterdir() if path.is_file() and not path.name.endswith(".tmp") and path.name != CARD_FILE
    )
    golden_path = folder / GOLDEN_TENSORS
    contents = {
        STATISTICS_TENSORS: _describe_tensors(tensors),
        STATISTICS_JSON: "class names, backbone, dataset, image counts, preprocessing",
        GOLDEN_TENSORS: _describe_tensors(load_file(golden_path)) if golden_path.is_file() else "",
        GOLDEN_JSON: "how the golden classifier was trained, its accuracy",
        CONFIG_FILE: "the sfm-hf config of the run",
    }
    cache = folder / FEATURES_DIR
    cache_bytes = sum(path.stat().st_size for path in cache.glob("*")) if cache.is_dir() else 0
    backbone = facts.statistics.get("backbone") or {}
    source = facts.source_dataset
    card_data = ModelCardData(
        base_model=facts.config.backbone if is_hub_id(facts.config.backbone) else None,
        datasets=[source] if is_hub_id(source) else None,
        license=license_name,
        tags=["sfm", "dataset-distillation", "class-statistics", "golden-classifier"],
    )
    card = make_card(
        ModelCard, "statistics_card.md.j2", card_data, facts.redact,
        repo_id=names.statistics,
        source=public_name(source),
        backbone_name=public_name(facts.config.backbone),
        backbone=backbone,
        statistics=facts.statistics,
        num_classes=int(tensors["class_means"].shape[0]),
        feature_dim=int(tensors["class_means"].shape[1]),
        golden=facts.golden,
        files=files,
        contents=contents,
        cache_bytes=cache_bytes,
        features_dir=FEATURES_DIR,
        dataset_repo=names.dataset,
        paper=PAPER,
    )
    card.save(folder / CARD_FILE)
    return folder


def _describe_tensors(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(
        f"`{name}` {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}" for name, tensor in tensors.items()
    )


# ---------------------------------------------------------------------------------------------
# Publishing


@dataclass
class Upload:
    """One folder to one Hub repo, in one commit."""

    what: str
    repo_id: str
    repo_type: str
    folder: Path
    ignore_patterns: list[str]
    # Files on the Hub that this commit replaces: those matching and not uploaded again are deleted (stale).
    delete_patterns: list[str]


TEXT_SUFFIXES = (".json", ".md", ".yaml", ".txt")


def uploads(config: Config, names: RepoNames, folders: dict[str, Path | None]) -> list[Upload]:
    dataset_configs = []
    if folders.get("dataset") is not None:
        dataset_configs = sorted(path.name for path in (folders["dataset"] / VARIANTS_DIR).iterdir() if path.is_dir())
    plans = {
        # Other runs' configs in the same dataset repo are kept: only this folder's configs are replaced.
        "dataset": (names.dataset, "dataset", SYNTHETIC_LOCAL_ONLY,
                    [f"{VARIANTS_DIR}/{name}/*" for name in dataset_configs]),
        "model": (names.model, "model", ["*.tmp"], ["*"]),
        # A model repo: its safetensors + json files would make the dataset viewer mistake it for a dataset.
        "statistics": (names.statistics, "model", STATISTICS_LOCAL_ONLY, ["*"]),
    }
    return [
        Upload(what, plans[what][0], plans[what][1], folders[what], list(plans[what][2]), list(plans[what][3]))
        for what in config.hub.folders if folders.get(what) is not None
    ]


def _matches(path: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def commit_operations(api, upload: Upload, redact: PathRedactor, revision: str | None,
                      replace: dict[str, bytes] | None = None) -> list:
    """Every file of the folder (text with local paths shortened), ``replace``'d files, and deletions of stale ones."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    replace = replace or {}
    additions = []
    for path in sorted(upload.folder.rglob("*")):
        relative = path.relative_to(upload.folder).as_posix()
        if not path.is_file() or _matches(relative, upload.ignore_patterns):
            continue
        if relative in replace:
            content: bytes | str = replace[relative]
        elif path.suffix in TEXT_SUFFIXES:
            content = redact(path.read_text()).encode()
        else:
            content = str(path)
        additions.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))
    uploaded = {operation.path_in_repo for operation in additions}
    try:
        remote = api.list_repo_files(upload.repo_id, repo_type=upload.repo_type, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        remote = []
    deletions = [
        CommitOperationDelete(path_in_repo=path) for path in remote
        if path not in uploaded and path != ".gitattributes" and _matches(path, upload.delete_patterns)
    ]
    return deletions + additions


def hub_dataset_card_data(api, repo_id: str, revision: str | None):
    """The metadata of the dataset card on the Hub, or None for a repo without one."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id=repo_id, filename=CARD_FILE, repo_type="dataset", revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    return DatasetCard.load(path).data


def _describe_failure(error: Exception) -> str:
    """The error's class and text, with the HTTP status when the text leaves it out (the Hub's often does)."""
    text = f"{error.__class__.__name__}: {error}"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return text if status is None or str(status) in text else f"{text} (HTTP {status})"


def publish(config: Config, names: RepoNames, facts: RunFacts, folders: dict[str, Path | None],
            license_name: str | None) -> list[str]:
    """One commit per exported folder (create_repo(exist_ok=True) first); returns the repo or pull-request URLs.

    The token is whatever huggingface_hub finds (HF_TOKEN, the login cache); it is never read
    here. A failure leaves the local folders as they are and raises :class:`PublishError` naming
    what to re-run.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    hub = config.hub
    api = HfApi()
    done, failed = [], []
    for upload in uploads(config, names, folders):
        try:
            api.create_repo(repo_id=upload.repo_id, repo_type=upload.repo_type, private=hub.private, exist_ok=True)
            if hub.revision:
                api.create_branch(upload.repo_id, branch=hub.revision, repo_type=upload.repo_type, exist_ok=True)
            replace = {}
            if upload.what == "dataset":
                hub_card_data = hub_dataset_card_data(api, upload.repo_id, hub.revision)
                if hub_card_data is not None:
                    # The repo's card lists the configs other runs pushed too; the local card keeps describing the
                    # local folder.
                    variants_root = upload.folder / VARIANTS_DIR
                    local = [read_variant(path) for path in sorted(variants_root.iterdir()) if path.is_dir()]
                    card = dataset_card(local, facts, names, license_name=license_name, hub_card_data=hub_card_data)
                    replace[CARD_FILE] = str(card).encode()
            commit = api.create_commit(
                repo_id=upload.repo_id, repo_type=upload.repo_type, revision=hub.revision, create_pr=hub.create_pr,
                operations=commit_operations(api, upload, facts.redact, hub.revision, replace),
                commit_message=f"sfm-hf export: {upload.what} ({names.dataset_config})",
            )
            prefix = "datasets/" if upload.repo_type == "dataset" else ""
            done.append(getattr(commit, "pr_url", None) or f"https://huggingface.co/{prefix}{upload.repo_id}")
        except (HfHubHTTPError, HTTPError, OSError, ValueError) as error:
            failed.append(f"{upload.what} -> {upload.repo_id}: {_describe_failure(error)}")
    if failed:
        raise PublishError(
            "Upload failed for " + "; ".join(failed) + f". The local folders in {facts.output_dir} are intact; after "
            "fixing the cause (login: `hf auth login`; network; permissions on the org) re-run only the upload with "
            f"`sfm-hf --config <recipe> --output_dir {facts.output_dir} --stages export --hub.push true`."
            + (f" Already uploaded: {', '.join(done)}." if done else "")
        )
    return done


# ---------------------------------------------------------------------------------------------


@dataclass
class Exported:
    """Where the export put things."""

    names: RepoNames
    folders: dict[str, Path | None]
    urls: list[str]


def snippets(folders: dict[str, Path | None]) -> dict[str, list[str]]:
    """Two lines that load each exported folder (the same lines work with the Hub repo id)."""
    lines = {}
    if folders.get("dataset"):
        lines["dataset"] = [
            "from datasets import load_dataset",
            f"synthetic = load_dataset({str(folders['dataset'])!r}, split='train')",
        ]
    if folders.get("model"):
        lines["model"] = [
            "from transformers import pipeline",
            f"classify = pipeline('image-classification', model={str(folders['model'])!r}, trust_remote_code=True)",
        ]
    if folders.get("statistics"):
        lines["statistics"] = [
            "from safetensors.torch import load_file",
            f"statistics = load_file({str(folders['statistics'] / STATISTICS_TENSORS)!r})",
        ]
    return lines


def run_export(config: Config, accelerator) -> Exported | None:
    """The export stage (main process only; the others wait). Returns what it wrote on the main process."""
    exported = None
    if accelerator.is_main_process:
        exported = export_run(config)
        logger.info(summary(exported))
    accelerator.wait_for_everyone()
    return exported


def export_run(config: Config) -> Exported:
    facts = gather_facts(config)
    names = repo_names(config, facts.source_dataset)
    license_name = config.hub.license or source_license(facts.source_dataset)
    wanted = set(config.hub.folders)
    folders: dict[str, Path | None] = {"dataset": export_dataset(facts, names, license_name)}
    folders["model"] = export_model(facts, names, license_name, folders["dataset"]) if "model" in wanted else None
    folders["statistics"] = export_statistics(facts, names, license_name) if "statistics" in wanted else None
    urls = publish(config, names, facts, folders, license_name) if config.hub.push else []
    return Exported(names=names, folders=folders, urls=urls)


def folder_bytes(folder: Path, ignore: list[str] | None = None) -> int:
    """Bytes of the files under ``folder`` that an upload with ``ignore`` patterns would send."""
    return sum(
        path.stat().st_size for path in folder.rglob("*")
        if path.is_file() and not _matches(path.relative_to(folder).as_posix(), ignore or [])
    )


def summary(exported: Exported) -> str:
    ignores = {"dataset": SYNTHETIC_LOCAL_ONLY, "model": [], "statistics": STATISTICS_LOCAL_ONLY}
    repos = {"dataset": exported.names.dataset, "model": exported.names.model, "statistics": exported.names.statistics}
    lines = ["Export: Hub-layout folders (bytes that an upload sends; local-only files excluded)"]
    code = snippets(exported.folders)
    for what in ("dataset", "model", "statistics"):
        folder = exported.folders.get(what)
        if folder is None:
            continue
        size = folder_bytes(folder, ignores[what])
        lines.append(f"  {what:<10} {folder}  ({human_size(size)}; repo {repos[what]})")
        lines.extend(f"      {line}" for line in code[what])
    if exported.urls:
        lines.append("Pushed: " + ", ".join(exported.urls))
    return "\n".join(lines)

