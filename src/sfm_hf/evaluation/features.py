"""Cached features of a whole split through one backbone (Stage I's cache of phi_d reused), per eval backbone."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..backbones import FrozenBackbone
from ..config import Config
from ..data import DatasetError
from ..names import short_name
from ..utils import write_text_atomically
from ..layout import FEATURES_DIR, GOLDEN_JSON, STATISTICS_JSON, RunLayout
from ..statistics import load_feature_cache, open_config_split, stream_features


@dataclass
class FeatureSet:
    features: torch.Tensor  # float16 [N, D]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N]; row numbers, -1 for a streamed split


def _stage_one_cache_matches(config: Config, split: str, prefix: str) -> bool:
    """Whether Stage I's cache of phi_d holds ``split`` of this dataset (the eval split may have changed since)."""
    directory = RunLayout(config.output_dir).statistics_dir
    try:
        statistics = json.loads((directory / STATISTICS_JSON).read_text())
        golden = json.loads((directory / GOLDEN_JSON).read_text())
    except FileNotFoundError:
        return False
    cached_split = statistics.get("split") if prefix == "train" else golden.get("eval_split")
    same_normalization = statistics.get("normalization", "backbone") == config.data.normalization
    return statistics.get("dataset") == config.dataset and cached_split == split and same_normalization


def split_features(
    config: Config, accelerator, backbone: FrozenBackbone, split: str, prefix: str, class_names: list[str]
) -> FeatureSet:
    """Features of ``split`` through ``backbone``, computed once and cached; call it on every process.

    Every process streams a disjoint share and writes its own shards; all of them then read all
    shards, so every image counts exactly once whatever the number of processes.
    """
    if backbone.name == config.backbone and _stage_one_cache_matches(config, split, prefix):
        return FeatureSet(*load_feature_cache(RunLayout(config.output_dir).statistics_dir / FEATURES_DIR, prefix))
    cache_dir = RunLayout(config.output_dir).feature_cache(backbone.name)
    marker = cache_dir / f"{prefix}.json"
    key = {
        "backbone": backbone.name,
        "dataset": config.dataset,
        "dataset_config": config.dataset_config,
        "split": split,
        "max_samples_per_split": config.data.max_samples_per_split,
        "crop_ratio": config.data.crop_ratio,
        "normalization": config.data.normalization,
    }
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored["key"] == key:
            cached = FeatureSet(*load_feature_cache(cache_dir, prefix))
            if len(cached.labels) == stored["images"]:
                return cached
    source = open_config_split(config, split)
    if source.class_names != class_names:
        raise DatasetError(
            f"Split {split!r} has {source.num_classes} classes ({source.class_names[:5]}...), but the statistics "
            f"have {len(class_names)} ({class_names[:5]}...): evaluate on a split of the same dataset."
        )
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    feature_pass = stream_features(
        backbone, source, config.data, accelerator, cache_dir=cache_dir, prefix=prefix,
        description=f"Stage III: {split} through {short_name(backbone.name)}", progress_mode=config.progress,
    )
    if feature_pass.seen == 0:
        raise DatasetError(
            f"No usable image in split {split!r} of {config.dataset!r} ({feature_pass.skipped} skipped, e.g. "
            f"{feature_pass.skipped_examples})."
        )
    if accelerator.is_main_process:
        write_text_atomically(marker, json.dumps({"key": key, "images": feature_pass.seen}, indent=2))
    accelerator.wait_for_everyone()
    cached = FeatureSet(*load_feature_cache(cache_dir, prefix))
    if len(cached.labels) != feature_pass.seen:
        raise RuntimeError(f"{cache_dir} holds {len(cached.labels)} {prefix} rows, {feature_pass.seen} were streamed.")
    return cached


@dataclass
class EvalBackbone:
    name: str
    backbone: FrozenBackbone
    evaluation: FeatureSet
    train: FeatureSet | None  # for the full-dataset probe and the plateau check

    def validation_slice(self, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random subset of ``count`` cached real train rows (all of them if fewer)."""
        order = torch.randperm(len(self.train.labels), generator=torch.Generator().manual_seed(seed))[:count]
        order = torch.sort(order).values
        return self.train.features[order].float(), self.train.labels[order]


@torch.no_grad()
def features_of(backbone: FrozenBackbone, images: torch.Tensor) -> torch.Tensor:
    """Un-augmented features of whole images (the backbone resizes them), on the CPU."""
    device = next(backbone.buffers()).device
    return torch.cat([backbone(chunk.to(device)).cpu() for chunk in images.split(256)])
