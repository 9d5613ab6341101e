"""Stage I: one streamed pass of the real data -> class statistics, a feature cache, the golden classifier.

Outputs in ``<output_dir>/statistics/``:
- ``statistics.safetensors``: ``class_means`` [C, D] float32, ``class_counts`` [C] int64, ``class_sums`` float64;
- ``statistics.json``: class names, backbone, dataset, images seen/skipped, world size, timing;
- ``features/{train,eval}-rankRR-KKKKK.safetensors``: float16 features, labels, row indices;
- ``golden_classifier.safetensors`` (``weight`` [C, D], ``bias`` [C]) and ``golden_classifier.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from accelerate.logging import get_logger

from .backbones import FrozenBackbone, load_backbone
from .config import Config, DataOptions
from .errors import StageInputError
from .layout import (
    FEATURES_DIR, GOLDEN_JSON, GOLDEN_TENSORS, STATISTICS_JSON, STATISTICS_OUTPUTS, STATISTICS_TENSORS, RunLayout,
    feature_shard, feature_shards,
)
from .data import DatasetError, SplitSource, as_float, image_batches, open_split
from .objectives import statistical_flow
from .probe import accuracy, fit_reference_probe
from .progress import progress as track
from .utils import (
    file_digest, gather_lists, load_tensors, save_tensors_atomically, unreadable_file, write_text_atomically,
)

logger = get_logger(__name__)

ROWS_PER_SHARD = 16384
# statistics.json key saying why a statistics folder has no golden classifier (merged statistics without features).
GOLDEN_MISSING_KEY = "golden_classifier_missing"


class StatisticsFileError(StageInputError):
    """A statistics folder whose files are unreadable, incomplete or inconsistent."""


@dataclass
class Statistics:
    """Per-class feature centres of the real train split through the distillation backbone."""

    class_means: torch.Tensor
    class_counts: torch.Tensor
    class_names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of statistics.safetensors; set by save() and load(). Later stages record it as their input.
    digest: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_dim(self) -> int:
        return self.class_means.shape[1]

    def flow(self, non_target: str | None = None) -> torch.Tensor:
        """The statistical flow F* (Eq. 8), [C, D]."""
        mode = non_target or self.metadata.get("non_target", "class_mean")
        return statistical_flow(self.class_means, self.class_counts, mode)

    def save(self, directory: Path, class_sums: torch.Tensor | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"class_means": self.class_means.float().contiguous(), "class_counts": self.class_counts}
        if class_sums is not None:
            tensors["class_sums"] = class_sums
        save_tensors_atomically(tensors, directory / STATISTICS_TENSORS)
        self.digest = file_digest(directory / STATISTICS_TENSORS)
        payload = {"class_names": self.class_names, **self.metadata, "digest": self.digest}
        write_text_atomically(directory / STATISTICS_JSON, json.dumps(payload, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "Statistics":
        """Read a Stage I folder; anything unreadable or inconsistent is a :class:`StatisticsFileError`."""
        directory = Path(directory)
        tensor_path, json_path = directory / STATISTICS_TENSORS, directory / STATISTICS_JSON
        if not tensor_path.is_file():
            raise StageInputError(
                f"No statistics in {directory}: run the 'statistics' stage first (or point at a statistics folder)."
            )
        recompute = "delete it and run the 'statistics' stage again (or point `statistics_from` at a complete folder)"
        tensors = load_tensors(tensor_path, "a statistics file", recompute, error_type=StatisticsFileError)
        try:
            metadata = json.loads(json_path.read_text())
            class_names = list(metadata.pop("class_names"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise StatisticsFileError(
                f"{json_path} is missing or damaged ({error.__class__.__name__}: {error}); {recompute}."
            ) from None
        means, counts = tensors.get("class_means"), tensors.get("class_counts")
        if means is None or counts is None:
            raise StatisticsFileError(f"{tensor_path} lacks class_means or class_counts; {recompute}.")
        if means.ndim != 2 or counts.shape != (means.shape[0],) or means.shape[0] != len(class_names):
            raise StatisticsFileError(
                f"{tensor_path} holds class_means {list(means.shape)} and class_counts {list(counts.shape)}, but "
                f"{json_path.name} names {len(class_names)} classes: the two files do not belong together; {recompute}."
            )
        if not bool(torch.isfinite(means).all()):
            raise StatisticsFileError(
                f"{tensor_path} holds NaN or infinite class means (a backbone that overflowed?); {recompute}."
            )
        metadata.pop("digest", None)
        return cls(means, counts, class_names, metadata, digest=file_digest(tensor_path))


@dataclass
class FeaturePass:
    """What one pass of a split through a backbone produced, summed over all processes."""

    class_sums: torch.Tensor  # float64 [C, D]
    class_counts: torch.Tensor  # int64 [C]
    seen: int
    skipped: int
    skipped_examples: list[str]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.seen / max(self.seconds, 1e-9)


class _ShardWriter:
    """Writes one process's features of a split into a feature cache, ROWS_PER_SHARD rows a file (never all in RAM)."""

    def __init__(self, cache_dir: Path, prefix: str, rank: int) -> None:
        self.cache_dir, self.prefix, self.rank = cache_dir, prefix, rank
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.pending_rows = self.written = 0

    def add(self, features: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        self.pending.append((features.half().cpu(), labels, indices))
        self.pending_rows += len(labels)
        if self.pending_rows >= ROWS_PER_SHARD:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        features, labels, indices = (torch.cat(parts) for parts in zip(*self.pending))
        save_tensors_atomically(
            {"features": features.contiguous(), "labels": labels, "indices": indices},
            feature_shard(self.cache_dir, self.prefix, self.rank, self.written),
        )
        self.pending, self.pending_rows, self.written = [], 0, self.written + 1


def _open_cache(cache_dir: Path, prefix: str, accelerator) -> _ShardWriter:
    """This process's writer into ``cache_dir``, once the main process has removed the split's old shards
    (those of an earlier run, perhaps with more processes, would silently join this one's)."""
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in feature_shards(cache_dir, prefix):
            stale.unlink()
    accelerator.wait_for_everyone()
    return _ShardWriter(cache_dir, prefix, accelerator.process_index)


class _ClassTally:
    """Per-class float64 feature sums and counts of this process's images, and what it skipped."""

    def __init__(self, num_classes: int, dim: int, device: torch.device) -> None:
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.seen = self.skipped = 0
        self.skipped_examples: list[str] = []

    def add(self, batch, features: torch.Tensor | None) -> None:
        self.skipped += batch.skipped
        self.skipped_examples.extend(batch.skipped_examples[: max(0, 5 - len(self.skipped_examples))])
        if features is not None:
            labels = batch.labels.to(features.device)
            self.sums.index_add_(0, labels, features.double())
            self.counts += torch.bincount(labels, minlength=len(self.counts))
            self.seen += len(labels)

    def reduce(self, accelerator, start: float) -> FeaturePass:
        """The totals over all processes; ``start``: perf_counter() when the pass began."""
        tallies = torch.tensor([self.seen, self.skipped], dtype=torch.int64, device=self.sums.device)
        sums = accelerator.reduce(self.sums, reduction="sum")
        counts = accelerator.reduce(self.counts, reduction="sum")
        tallies = accelerator.reduce(tallies, reduction="sum")
        return FeaturePass(
            class_sums=sums.cpu(),
            class_counts=counts.cpu(),
            seen=int(tallies[0]),
            skipped=int(tallies[1]),
            skipped_examples=gather_lists(accelerator, self.skipped_examples)[:5],
            seconds=time.perf_counter() - start,
        )


def _share_size(source: SplitSource, data: DataOptions, rank: int, world_size: int) -> int | None:
    """How many rows process ``rank`` reads (for the progress bar), when the split says its size."""
    if source.num_rows is None:
        return None
    rows = source.num_rows if data.max_samples_per_split is None else min(source.num_rows, data.max_samples_per_split)
    return rows * (rank + 1) // world_size - rows * rank // world_size


def stream_features(
    backbone: FrozenBackbone,
    source: SplitSource,
    data: DataOptions,
    accelerator,
    *,
    cache_dir: Path | None = None,
    prefix: str = "train",
    description: str = "features",
    progress_mode: str = "auto",
) -> FeaturePass:
    """Stream this process's share of ``source`` through ``backbone``; sums/counts are reduced over processes.

    With ``cache_dir`` the features are also written as float16 shards (never all in RAM).
    """
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    writer = _open_cache(cache_dir, prefix, accelerator) if cache_dir is not None else None
    tally = _ClassTally(source.num_classes, backbone.feature_dim, device)
    start = time.perf_counter()
    progress = track(total=_share_size(source, data, rank, world_size), unit="img", desc=description,
                     mode=progress_mode, enabled=accelerator.is_local_main_process)
    batches = image_batches(
        source,
        image_size=backbone.image_size,
        batch_size=data.batch_size,
        crop_ratio=data.crop_ratio,
        num_workers=data.num_workers,
        rank=rank,
        world_size=world_size,
        max_samples=data.max_samples_per_split,
    )
    with torch.inference_mode():
        for batch in batches:
            features = None
            if len(batch.labels):
                features = backbone(as_float(batch.images.to(device, non_blocking=True)))
                if writer is not None:
                    writer.add(features, batch.labels, batch.indices)
            tally.add(batch, features)
            progress.update(len(batch.labels) + batch.skipped)
    if writer is not None:
        writer.flush()
    progress.close()
    return tally.reduce(accelerator, start)


def _recompute_cache(cache_dir: Path) -> str:
    return f"delete {cache_dir} and run the 'statistics' stage again"


def cached_row_indices(cache_dir: Path, prefix: str) -> torch.Tensor | None:
    """The row numbers of a split's cached features (-1 where it was streamed), or None without a cache;
    reads the index tensors only, not the features."""
    shards = feature_shards(cache_dir, prefix)
    if not shards:
        return None
    parts = []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                parts.append(handle.get_tensor("indices"))
        except Exception as error:  # noqa: BLE001 -- safetensors raises several types for a damaged file
            raise unreadable_file(shard, "a feature-cache shard", _recompute_cache(cache_dir), error) from None
    return torch.cat(parts)


def load_feature_cache(cache_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All cached (features fp16, labels, indices) of a split, in row order when rows are known.

    Row order makes everything trained on the cache independent of how many processes wrote it.
    """
    shards = feature_shards(cache_dir, prefix)
    if not shards:
        raise StageInputError(f"No cached {prefix} features in {cache_dir}: run the 'statistics' stage first.")
    parts = [load_tensors(shard, "a feature-cache shard", _recompute_cache(cache_dir),
                          keys=("features", "labels", "indices")) for shard in shards]
    features = torch.cat([part["features"] for part in parts])
    labels = torch.cat([part["labels"] for part in parts])
    indices = torch.cat([part["indices"] for part in parts])
    if bool((indices >= 0).all()):
        order = torch.argsort(indices)
        features, labels, indices = features[order], labels[order], indices[order]
    return features, labels, indices


def _check_classes(feature_pass: FeaturePass, source: SplitSource) -> None:
    if feature_pass.seen == 0:
        raise DatasetError(
            f"No usable image in split {source.split!r} of {source.name!r} "
            f"({feature_pass.skipped} skipped, e.g. {feature_pass.skipped_examples})."
        )
    empty = [name for name, count in zip(source.class_names, feature_pass.class_counts.tolist()) if count == 0]
    if empty:
        raise DatasetError(
            f"{len(empty)} class(es) have no image in split {source.split!r} of {source.name!r}: {empty[:20]}. "
            "Every class needs real images for its centre."
        )


def check_same_classes(train: SplitSource, evaluation: SplitSource) -> None:
    """Train and eval splits must name the same classes in the same order; say which ones differ."""
    if evaluation.class_names == train.class_names:
        return
    only_train = [name for name in train.class_names if name not in evaluation.class_names]
    only_eval = [name for name in evaluation.class_names if name not in train.class_names]
    detail = (
        f"only in {train.split!r}: {only_train[:10]}; only in {evaluation.split!r}: {only_eval[:10]}"
        if only_train or only_eval else "the same names in a different order"
    )
    raise DatasetError(
        f"Splits {train.split!r} ({train.num_classes} classes) and {evaluation.split!r} ({evaluation.num_classes}) "
        f"of {train.name!r} have different classes ({detail}): evaluate on a split with the same classes."
    )


def _same_source(recorded: Any, given: Any) -> bool:
    """Equal values, or two spellings of one local folder (relative / absolute, trailing slash)."""
    if recorded == given:
        return True
    if not (isinstance(recorded, str) and isinstance(given, str) and recorded and given):
        return False
    first, second = (Path(name.removeprefix("local-dir:")).expanduser() for name in (recorded, given))
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def check_statistics_inputs(config: Config, statistics: Statistics, directory: Path) -> None:
    """Refuse this run's own statistics when Stage I made them from other inputs than ``config`` names: another
    dataset, train split or backbone, or other preprocessing. Later stages read them against the dataset and
    backbone the config names (Stage I's row numbers pick the start and baseline images), so a mismatch would
    silently build on the wrong images. Statistics from ``statistics_from`` are inputs in their own right."""
    if config.statistics_from:
        return
    recorded = {**statistics.metadata, "backbone": (statistics.metadata.get("backbone") or {}).get("name")}
    # statistics.json key -> (the option it records, its value in this run).
    given = {
        "dataset": ("dataset", config.dataset),
        "dataset_config": ("dataset_config", config.dataset_config),
        "split": ("train_split", config.train_split),
        "backbone": ("backbone", config.backbone),
        "max_samples_per_split": ("data.max_samples_per_split", config.data.max_samples_per_split),
        "crop_ratio": ("data.crop_ratio", config.data.crop_ratio),
        "normalization": ("data.normalization", config.data.normalization),
    }
    changed = [(option, recorded[key], value) for key, (option, value) in given.items()
               if key in recorded and not _same_source(recorded[key], value)]
    if changed:
        details = "; ".join(f"{option} {there!r} there, {here!r} here" for option, there, here in changed)
        raise StageInputError(
            f"The statistics in {directory} were made with different settings or inputs than this run's ({details}): "
            "add 'statistics' to --stages to make them from this run's inputs, or use the output_dir of a run made "
            "with them."
        )


def check_ipc_fits(config: Config, class_counts: torch.Tensor, class_names: list[str]) -> None:
    """The random and centroid baselines of Stage III take ``ipc`` real train images of every class."""
    baselines = [name for name in ("random", "centroids") if name in config.evaluate.train_sets]
    if "evaluate" not in config.stages or not baselines:
        return
    short = [(name, int(count)) for name, count in zip(class_names, class_counts.tolist()) if count < config.ipc]
    if short:
        raise DatasetError(
            f"`ipc` is {config.ipc} but {len(short)} class(es) have fewer train images, e.g. {short[:5]} (name, "
            f"images): the {baselines} baseline(s) of Stage III take ipc real images per class. Lower ipc, or remove "
            "them from `evaluate.train_sets`."
        )


def _report_skipped(feature_pass: FeaturePass, split: str) -> None:
    if feature_pass.skipped:
        logger.warning(
            "Skipped %d undecodable or unlabelled image(s) in split %r, e.g. %s",
            feature_pass.skipped, split, "; ".join(feature_pass.skipped_examples),
        )


def open_config_split(config: Config, split: str) -> SplitSource:
    return open_split(
        config.dataset,
        split,
        config_name=config.dataset_config,
        image_column=config.image_column,
        label_column=config.label_column,
        streaming=config.data.streaming,
    )


def run_statistics(config: Config, accelerator) -> Statistics:
    """Stage I of one backbone. Every process reads a disjoint share; the results do not depend on how many there are.

    A joint run's members each go through here (:mod:`sfm_hf.multi`).
    """
    output = RunLayout(config.output_dir).statistics_dir
    cache_dir = output / FEATURES_DIR
    backbone = load_backbone(config.backbone, device=accelerator.device, normalization=config.data.normalization)
    train = open_config_split(config, config.train_split)
    evaluation = open_config_split(config, config.eval_split)
    check_same_classes(train, evaluation)
    if accelerator.is_main_process:
        # The feature cache is about to be rewritten: outputs describing the old one must not outlive it,
        # even when this pass fails half-way.
        for name in STATISTICS_OUTPUTS:
            (output / name).unlink(missing_ok=True)
    train_pass = stream_features(
        backbone, train, config.data, accelerator, cache_dir=cache_dir, prefix="train", description="Stage I: train",
        progress_mode=config.progress,
    )
    _report_skipped(train_pass, config.train_split)
    _check_classes(train_pass, train)
    eval_pass = stream_features(
        backbone, evaluation, config.data, accelerator, cache_dir=cache_dir, prefix="eval", description="Stage I: eval",
        progress_mode=config.progress,
    )
    _report_skipped(eval_pass, config.eval_split)
    if eval_pass.seen == 0:
        raise DatasetError(
            f"No usable image in split {config.eval_split!r} of {config.dataset!r} ({eval_pass.skipped} skipped, e.g. "
            f"{eval_pass.skipped_examples}): fix or replace those files, or set `eval_split` to another split."
        )
    class_means = (train_pass.class_sums / train_pass.class_counts.unsqueeze(1).double()).float()
    broken = [name for name, row in zip(train.class_names, class_means) if not bool(torch.isfinite(row).all())]
    if broken:
        raise DatasetError(
            f"The backbone {config.backbone!r} gave NaN or infinite features for class(es) {broken[:10]}, so no "
            "statistics were saved; check the backbone (try data without mixed precision) before re-running."
        )
    check_ipc_fits(config, train_pass.class_counts, train.class_names)
    statistics = Statistics(
        class_means=class_means,
        class_counts=train_pass.class_counts,
        class_names=train.class_names,
        metadata={
            "backbone": backbone.describe(),
            "dataset": config.dataset,
            "dataset_config": config.dataset_config,
            "split": config.train_split,
            "non_target": config.statistics.non_target,
            "normalization": config.data.normalization,
            "eval_split": config.eval_split,
            "crop_ratio": config.data.crop_ratio,
            "max_samples_per_split": config.data.max_samples_per_split,
            "images_seen": train_pass.seen,
            "images_skipped": train_pass.skipped,
            "skipped_examples": train_pass.skipped_examples,
            "world_size": accelerator.num_processes,
            "seconds": round(train_pass.seconds, 3),
            "images_per_second": round(train_pass.images_per_second, 1),
            "preprocessing": (
                f"shorter side -> {backbone.image_size}/{config.data.crop_ratio}, centre crop {backbone.image_size}, "
                f"normalise mean={list(backbone.info.mean)} std={list(backbone.info.std)}, float32, no augmentation"
            ),
        },
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        statistics.save(output, class_sums=train_pass.class_sums)
        golden, fitted = train_golden_classifier(config, cache_dir, statistics.num_classes)
        save_golden_classifier(golden, output)
        eval_features, eval_labels, _ = load_feature_cache(cache_dir, "eval")
        golden_report = {
            "eval_split": config.eval_split,
            "eval_images": len(eval_labels),
            "eval_accuracy": accuracy(golden, eval_features, eval_labels),
            "trained_on": f"cached centre-crop features of all {train_pass.seen} {config.train_split!r} images",
            **fitted,
        }
        write_text_atomically(output / GOLDEN_JSON, json.dumps(golden_report, indent=2))
        logger.info(
            f"Stage I: {train_pass.seen} images of {statistics.num_classes} classes "
            f"({train_pass.skipped} skipped) through {backbone.family} (D={backbone.feature_dim}) on "
            f"{accelerator.num_processes} process(es) in {train_pass.seconds:.1f} s "
            f"({train_pass.images_per_second:.0f} img/s). Golden classifier accuracy on {config.eval_split!r}: "
            f"{golden_report['eval_accuracy']:.2%} ({len(eval_labels)} images). -> {output}"
        )
        accelerator.log({
            "statistics/images_per_second": train_pass.images_per_second,
            "statistics/images": train_pass.seen,
            "statistics/skipped": train_pass.skipped,
            "statistics/golden_accuracy": golden_report["eval_accuracy"],
        })
    accelerator.wait_for_everyone()
    return statistics


def train_golden_classifier(config: Config, cache_dir: Path, num_classes: int) -> tuple[torch.nn.Linear, dict]:
    """The golden classifier f on the cached phi_d features of the full train split, and how it was fitted."""
    features, labels, _ = load_feature_cache(cache_dir, "train")
    return fit_reference_probe(config.golden, features, labels, num_classes, seed=config.seed)


def save_golden_classifier(head: torch.nn.Linear, directory: Path) -> None:
    save_tensors_atomically(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        directory / GOLDEN_TENSORS,
    )


def golden_classifier_file(directory: str | Path) -> Path:
    """The golden classifier of a statistics folder; when there is none, a StageInputError that says why."""
    path = Path(directory) / GOLDEN_TENSORS
    if not path.is_file():
        reason = "run the 'statistics' stage first"
        metadata = Path(directory) / STATISTICS_JSON
        if metadata.is_file():
            reason = json.loads(metadata.read_text()).get(GOLDEN_MISSING_KEY, reason)
        raise StageInputError(f"No golden classifier in {directory}: {reason}.")
    return path


def load_golden_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """``weight`` [C, D] and ``bias`` [C] of a statistics folder's golden classifier, with a clear error when damaged."""
    return load_tensors(golden_classifier_file(directory), "a golden classifier",
                        "delete it and run the 'statistics' stage again", keys=("weight", "bias"))


def load_golden_classifier(directory: str | Path) -> torch.nn.Linear:
    tensors = load_golden_tensors(directory)
    head = torch.nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    return head.eval()
