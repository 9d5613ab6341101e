"""``statistics/``, the statistics repo: Stage I's own folder gains a card and the run's config."""

from __future__ import annotations

from pathlib import Path

import torch

from ..layout import (
    CARD_FILE, CONFIG_FILE, FEATURES_DIR, GOLDEN_JSON, GOLDEN_TENSORS, STATISTICS_JSON, STATISTICS_TENSORS,
)
from ..names import is_hub_id, public_name
from ..statistics import load_golden_tensors
from ..utils import load_tensors
from .cards import PAPER, make_card
from .facts import RepoNames, RunFacts, public_config_yaml


def export_statistics(facts: RunFacts, names: RepoNames, license_name: str | None) -> Path | None:
    """Add a card to this run's statistics/ (not to a ``statistics_from`` source, which is someone else's)."""
    from huggingface_hub import ModelCard, ModelCardData

    if facts.config.statistics_from:
        return None
    folder = facts.statistics_dir
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.recipe, facts.redact))
    tensors = load_tensors(folder / STATISTICS_TENSORS, "a statistics file",
                           "delete it and run the 'statistics' stage again", keys=("class_means",))
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in folder.iterdir() if path.is_file() and not path.name.endswith(".tmp") and path.name != CARD_FILE
    )
    golden_path = folder / GOLDEN_TENSORS
    contents = {
        STATISTICS_TENSORS: _describe_tensors(tensors),
        STATISTICS_JSON: "class names, backbone, dataset, image counts, preprocessing",
        GOLDEN_TENSORS: _describe_tensors(load_golden_tensors(folder)) if golden_path.is_file() else "",
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
        versions=facts.versions,
    )
    card.save(folder / CARD_FILE)
    return folder


def _describe_tensors(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(
        f"`{name}` {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}" for name, tensor in tensors.items()
    )

