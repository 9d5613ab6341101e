"""``synthetic/``, the dataset repo: one folder per named config (parquet, float images, records) and its card."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..layout import (
    CARD_FILE, CONFIG_FILE, IMAGES_FILE, PREVIEW_FILE, RESULTS_FILE, SYNTHETIC_JSON, VARIANTS_DIR, RunLayout,
)
from ..names import is_hub_id, public_name, slug
from ..report import reads_real_eval_data, same_network_ci
from ..snapshots import read_images
from .cards import make_card, size_category
from .facts import ExportError, RepoNames, RunFacts, public_config_yaml

PARQUET_NAME = "train-00000-of-00001.parquet"


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
            "projector_anchors": record.get("projector_anchors"),
            # What the card's row must say: real train data read through the eval backbone; same-network CI.
            "real_eval_data": record.get("real_eval_data") if reads_real_eval_data(record) else [],
            "same_network": same_network_ci(record),
        }
        for record in records
    ]



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
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.recipe, facts.redact))
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
        versions=facts.versions,
    )


def export_dataset(facts: RunFacts, names: RepoNames, license_name: str | None) -> Path:
    """synthetic/: this run's config under data/<config>/, included runs' configs, and the card."""
    folder = RunLayout(facts.output_dir).synthetic_dir
    images, labels = read_images(folder / IMAGES_FILE)
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

