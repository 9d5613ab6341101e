"""Merge Stage I outputs computed on disjoint shards of a dataset into what one pass over their union gives.

Stage I's statistics are per-class float64 sums and counts, so statistics from different
machines, different sites, or a dataset that grew merge exactly:
``python -m sfm_hf.merge A B ... --output C`` (or ``statistics_from: [A, B]`` in a recipe).

- The shards must agree on the backbone (name, feature, dimension), the preprocessing and the
  non-target centre; anything else would add up features that do not live in one space.
- Classes are matched by name. The merged order is the first shard's classes, then each class
  new in a later shard, in that shard's order: shards of one dataset keep its label ids, and a
  shard that lacks a class adds zero to its sum and count. Shards that share no class name
  at all are refused (different naming schemes would silently double the classes) unless
  ``allow_disjoint_classes``.
- The golden classifier needs features, not statistics. When every shard kept its feature
  cache (``features/``), the caches are concatenated into the output's cache with the labels
  remapped to the merged ids and the classifier is refitted on them
  (:func:`sfm_hf.statistics.train_golden_classifier`); otherwise the output has no golden
  classifier and ``statistics.json`` says why (distillation does not need it; evaluation and
  the model bundle do, and say so).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .config import Config, GoldenOptions
from .errors import UserError
from .hub import statistics_source, statistics_sources
from .probe import accuracy
from .layout import (
    FEATURES_DIR, GOLDEN_JSON, GOLDEN_TENSORS, MERGING_MARKER, STATISTICS_JSON, STATISTICS_TENSORS, RunLayout,
    feature_shard, feature_shards,
)
from .statistics import (
    GOLDEN_MISSING_KEY,
    ROWS_PER_SHARD,
    Statistics,
    load_feature_cache,
    save_golden_classifier,
    train_golden_classifier,
)
from .utils import file_digest, load_tensors, read_json, save_tensors_atomically, write_text_atomically

logger = logging.getLogger(__name__)

MERGED_FROM_KEY = "merged_from"
MERGE_KEY = "merge_key"
# Everything that fixes the feature space a shard's sums live in.
COMPATIBILITY_KEYS = ("backbone", "preprocessing", "non_target")


class MergeError(UserError):
    """Statistics that cannot be merged, or an output folder that must not be written."""


@dataclass
class Shard:
    """One Stage I output folder: its exact sums and counts, class names and records."""

    folder: Path
    class_sums: torch.Tensor  # float64 [C, D]
    class_counts: torch.Tensor  # int64 [C]
    class_names: list[str]
    metadata: dict[str, Any]
    golden: dict[str, Any] | None  # golden_classifier.json, when present

    @classmethod
    def load(cls, folder: str | Path) -> "Shard":
        folder = Path(folder)
        tensor_path, json_path = folder / STATISTICS_TENSORS, folder / STATISTICS_JSON
        if not tensor_path.is_file() or not json_path.is_file():
            raise MergeError(
                f"{folder} holds no Stage I statistics (statistics.safetensors + statistics.json): give the "
                "`statistics/` folder of each shard's run."
            )
        remedy = "re-run the 'statistics' stage of that shard"
        tensors = load_tensors(tensor_path, "a statistics file", remedy, keys=("class_counts",), error_type=MergeError)
        if "class_sums" not in tensors:
            raise MergeError(
                f"{tensor_path} has no float64 `class_sums` (only means, which do not merge exactly): re-run the "
                "'statistics' stage of that shard with this version of sfm-hf."
            )
        metadata = read_json(json_path, "the statistics record of a shard", remedy, error_type=MergeError)
        golden_path = folder / GOLDEN_JSON
        golden = read_json(golden_path, "a golden classifier record", remedy, error_type=MergeError) \
            if golden_path.is_file() else None
        if not isinstance(metadata.get("class_names"), list):
            raise MergeError(f"{json_path} names no class_names: it is not a statistics record; {remedy}.")
        return cls(folder, tensors["class_sums"], tensors["class_counts"], metadata.pop("class_names"), metadata, golden)

    @property
    def cache_dir(self) -> Path:
        return self.folder / FEATURES_DIR

    def has_cache(self, prefix: str) -> bool:
        return bool(feature_shards(self.cache_dir, prefix))


def merged_class_names(shards: Sequence[Shard], allow_disjoint_classes: bool = False) -> list[str]:
    """The union of the shards' classes: the first shard's order, then new names in order of appearance."""
    names = list(shards[0].class_names)
    for shard in shards[1:]:
        known = set(names)
        if not allow_disjoint_classes and not known & set(shard.class_names):
            raise MergeError(
                f"{shard.folder} shares no class name with the shards before it ({shard.class_names[:5]} vs "
                f"{names[:5]}): the same classes named differently would become twice as many classes. Rename "
                "them alike, or pass --allow-disjoint-classes if they really are different classes."
            )
        names.extend(name for name in shard.class_names if name not in known)
    return names


def check_compatible(shards: Sequence[Shard]) -> None:
    """Refuse shards whose features do not live in one space."""
    first = shards[0]
    for shard in shards[1:]:
        for key in COMPATIBILITY_KEYS:
            if shard.metadata.get(key) != first.metadata.get(key):
                raise MergeError(
                    f"The shards differ in `{key}`: {first.folder} has {first.metadata.get(key)!r}, {shard.folder} "
                    f"has {shard.metadata.get(key)!r}. Only Stage I outputs of the same backbone and preprocessing "
                    "merge; re-run the odd shard with the others' settings."
                )


def _check_folders(folders: Sequence[Path], output: Path) -> None:
    resolved = [folder.resolve() for folder in folders]
    if not resolved:
        raise MergeError("Nothing to merge: give at least one statistics folder.")
    repeated = sorted({str(folder) for folder in resolved if resolved.count(folder) > 1})
    if repeated:
        raise MergeError(f"{repeated[0]} is listed twice: its images would count twice.")
    if output.resolve() in resolved:
        raise MergeError(f"The output {output} is one of the folders to merge: write the merge to a new folder.")
    if output.is_dir() and any(output.iterdir()):
        previous = output / STATISTICS_JSON
        is_merge = previous.is_file() and MERGED_FROM_KEY in json.loads(previous.read_text())
        if not is_merge and not (output / MERGING_MARKER).is_file():
            raise MergeError(
                f"The output folder {output} already holds files that are not an earlier merge: choose an empty or "
                "new folder (nothing there was changed)."
            )


def _remap(shard: Shard, names: list[str]) -> torch.Tensor:
    """Merged class id of each of the shard's class ids."""
    position = {name: index for index, name in enumerate(names)}
    return torch.tensor([position[name] for name in shard.class_names], dtype=torch.int64)


def merge_key(folders: Sequence[Path], golden: GoldenOptions, seed: int) -> str:
    """Identifies a merge by its inputs: the shards' exact statistics and the golden classifier's settings."""
    parts = [(str(Path(folder).resolve()), file_digest(Path(folder) / STATISTICS_TENSORS)) for folder in folders]
    payload = json.dumps({"shards": parts, "golden": dataclasses.asdict(golden), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def is_up_to_date(folders: Sequence[Path], output: Path, golden: GoldenOptions, seed: int) -> bool:
    path = output / STATISTICS_JSON
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get(MERGE_KEY) == merge_key(folders, golden, seed)


def _common(values: list[Any]) -> Any:
    """The one value all shards share, else all distinct values joined with ' + '."""
    distinct = list(dict.fromkeys(str(value) for value in values))
    return values[0] if len(distinct) == 1 else " + ".join(distinct)


def _recorded_golden_options(shards: Sequence[Shard]) -> tuple[GoldenOptions, int]:
    """The golden classifier settings the first shard recorded (defaults for any it did not)."""
    recorded = shards[0].golden or {}
    options = GoldenOptions()
    for option in dataclasses.fields(GoldenOptions):
        if option.name in recorded:
            setattr(options, option.name, type(getattr(options, option.name))(recorded[option.name]))
    return options, int(recorded.get("seed", 0))


def _shard_caches(shards: Sequence[Shard], prefix: str) -> Iterator[tuple[Shard, torch.Tensor, torch.Tensor]]:
    """(shard, features, labels) of each shard's cache of ``prefix``, read in the shard's row order.

    Row order makes the merge independent of how many processes wrote each shard.
    """
    for shard in shards:
        features, labels, _ = load_feature_cache(shard.cache_dir, prefix)
        yield shard, features, labels


def _distinct_eval_sets(shards: Sequence[Shard]) -> list[tuple[Shard, torch.Tensor, torch.Tensor]]:
    """The shards' eval caches, each set of eval images once: shards that scored the same split (same
    labels, features equal to float16 precision) would otherwise count it twice."""
    kept: list[tuple[Shard, torch.Tensor, torch.Tensor]] = []
    for shard, features, labels in _shard_caches([shard for shard in shards if shard.has_cache("eval")], "eval"):
        seen = any(
            torch.equal(labels, other_labels) and torch.allclose(features.float(), other.float(), rtol=1e-2, atol=1e-2)
            for _, other, other_labels in kept
        )
        if not seen:
            kept.append((shard, features, labels))
    return kept


def _write_merged_cache(
    parts: Iterable[tuple[Shard, torch.Tensor, torch.Tensor]], names: list[str], cache_dir: Path, prefix: str
) -> int:
    """Concatenate cached features with labels remapped to the merged ids; returns the number of rows.

    Row numbers are dropped (-1): they mean nothing across shards.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows = number = 0
    for shard, features, labels in parts:
        labels = _remap(shard, names)[labels]
        for start in range(0, len(labels), ROWS_PER_SHARD):
            chunk = slice(start, start + ROWS_PER_SHARD)
            save_tensors_atomically(
                {
                    "features": features[chunk].contiguous(),
                    "labels": labels[chunk].contiguous(),
                    "indices": torch.full_like(labels[chunk], -1),
                },
                feature_shard(cache_dir, prefix, 0, number),
            )
            number += 1
        rows += len(labels)
    return rows


def _refit_golden(
    shards: Sequence[Shard], names: list[str], output: Path, golden: GoldenOptions, seed: int
) -> dict[str, Any]:
    """Merged feature caches and the golden classifier refitted on them; returns its report."""
    cache_dir = output / FEATURES_DIR
    train_rows = _write_merged_cache(_shard_caches(shards, "train"), names, cache_dir, "train")
    head, fitted = train_golden_classifier(Config(golden=golden, seed=seed), cache_dir, len(names))
    save_golden_classifier(head, output)
    eval_sets = _distinct_eval_sets(shards)
    report: dict[str, Any] = {"eval_split": None, "eval_images": 0, "eval_accuracy": None, "eval_sources": []}
    if eval_sets:
        eval_rows = _write_merged_cache(eval_sets, names, cache_dir, "eval")
        eval_features, eval_labels, _ = load_feature_cache(cache_dir, "eval")
        report = {
            "eval_split": _common([(shard.golden or {}).get("eval_split") for shard, _, _ in eval_sets]),
            "eval_images": eval_rows,
            "eval_accuracy": accuracy(head, eval_features, eval_labels),
            "eval_sources": [str(shard.folder) for shard, _, _ in eval_sets],
        }
    return {
        **report,
        "trained_on": f"cached centre-crop features of all {train_rows} train images of {len(shards)} merged shards",
        **fitted,
    }


def merge_statistics(
    folders: Sequence[str | Path],
    output: str | Path,
    *,
    golden: GoldenOptions | None = None,
    seed: int | None = None,
    allow_disjoint_classes: bool = False,
) -> Statistics:
    """Merge the Stage I outputs in ``folders`` into ``output``; see the module docstring for the rules.

    ``golden`` / ``seed`` set how the golden classifier is refitted; by default the first
    shard's recorded settings.
    """
    folders, output = [Path(folder) for folder in folders], Path(output)
    shards, names = prepare_merge(folders, output, allow_disjoint_classes)
    if golden is None or seed is None:
        recorded, recorded_seed = _recorded_golden_options(shards)
        golden = recorded if golden is None else golden
        seed = recorded_seed if seed is None else seed
    return _write_merge(shards, names, output, golden, seed)


def prepare_merge(
    folders: Sequence[Path], output: Path, allow_disjoint_classes: bool = False
) -> tuple[list[Shard], list[str]]:
    """Every check of a merge, before anything is written: the shards and the merged class names."""
    _check_folders(folders, output)
    shards = [Shard.load(folder) for folder in folders]
    check_compatible(shards)
    return shards, merged_class_names(shards, allow_disjoint_classes)


def _write_merge(shards: list[Shard], names: list[str], output: Path, golden: GoldenOptions, seed: int) -> Statistics:
    class_sums = torch.zeros(len(names), shards[0].class_sums.shape[1], dtype=torch.float64)
    class_counts = torch.zeros(len(names), dtype=torch.int64)
    for shard in shards:
        ids = _remap(shard, names)
        class_sums.index_add_(0, ids, shard.class_sums)
        class_counts.index_add_(0, ids, shard.class_counts)
    first = shards[0].metadata
    metadata: dict[str, Any] = {
        "backbone": first.get("backbone"),
        "dataset": _common([shard.metadata.get("dataset") for shard in shards]),
        "dataset_config": _common([shard.metadata.get("dataset_config") for shard in shards]),
        "split": _common([shard.metadata.get("split") for shard in shards]),
        "non_target": first.get("non_target"),
        "preprocessing": first.get("preprocessing"),
        "images_seen": sum(int(shard.metadata.get("images_seen", 0)) for shard in shards),
        "images_skipped": sum(int(shard.metadata.get("images_skipped", 0)) for shard in shards),
        "skipped_examples": [example for shard in shards for example in shard.metadata.get("skipped_examples", [])][:5],
        MERGED_FROM_KEY: [
            {
                "folder": str(shard.folder.resolve()),
                "dataset": shard.metadata.get("dataset"),
                "split": shard.metadata.get("split"),
                "images_seen": shard.metadata.get("images_seen"),
                "classes": len(shard.class_names),
            }
            for shard in shards
        ],
    }
    statistics = Statistics(
        class_means=(class_sums / class_counts.unsqueeze(1).double()).float(),
        class_counts=class_counts,
        class_names=names,
        metadata=metadata,
    )

    # statistics.json is written last and marks a finished merge; until then `merging` marks an unfinished one.
    output.mkdir(parents=True, exist_ok=True)
    (output / MERGING_MARKER).write_text("a merge into this folder started and has not finished\n")
    for stale in (STATISTICS_JSON, GOLDEN_TENSORS, GOLDEN_JSON):
        (output / stale).unlink(missing_ok=True)
    shutil.rmtree(output / FEATURES_DIR, ignore_errors=True)
    without_cache = [str(shard.folder) for shard in shards if not shard.has_cache("train")]
    if without_cache:
        metadata[GOLDEN_MISSING_KEY] = (
            f"these are merged statistics and the shard(s) {without_cache} kept no feature cache ({FEATURES_DIR}/), "
            "which refitting the golden classifier on the union needs; merge the shards' full Stage I outputs "
            "(with their features/) to have one"
        )
    else:
        golden_report = _refit_golden(shards, names, output, golden, seed)
        write_text_atomically(output / GOLDEN_JSON, json.dumps(golden_report, indent=2))
    metadata[MERGE_KEY] = merge_key([shard.folder for shard in shards], golden, seed)
    statistics.save(output, class_sums=class_sums)
    (output / MERGING_MARKER).unlink()
    return statistics


def merge_for_run(config: Config) -> Path:
    """``statistics_from: [A, B, ...]``: the shards (folders or Hub repos) merged into <output_dir>/statistics.

    The main process merges, with the run's golden classifier settings, unless an earlier call
    already merged the same inputs; the others wait until the merge is there. No collective is
    used, so stages that read the statistics on the main process only (export) can call it too.
    Every process checks the shards first, so a refusal stops all of them.
    """
    from accelerate import PartialState

    output = RunLayout(config.output_dir).statistics_dir
    folders = [statistics_source(source) for source in statistics_sources(config)]
    shards, names = prepare_merge(folders, output)
    if PartialState().is_main_process:
        if not is_up_to_date(folders, output, config.golden, config.seed):
            statistics = _write_merge(shards, names, output, config.golden, config.seed)
            logger.info(summary(statistics, output))
        return output
    # Should the main process fail, the launcher stops this one too.
    while not is_up_to_date(folders, output, config.golden, config.seed):
        time.sleep(1.0)
    return output


def summary(statistics: Statistics, output: Path) -> str:
    shards = statistics.metadata[MERGED_FROM_KEY]
    golden_path = output / GOLDEN_JSON
    if golden_path.is_file():
        report = json.loads(golden_path.read_text())
        golden = "golden classifier refitted on the shards' features"
        if report["eval_accuracy"] is not None:
            golden += f" ({report['eval_accuracy']:.2%} on {report['eval_images']} eval images)"
    else:
        golden = f"no golden classifier: {statistics.metadata[GOLDEN_MISSING_KEY]}"
    return (
        f"Merged {len(shards)} shards: {statistics.metadata['images_seen']} images of {statistics.num_classes} "
        f"classes; {golden}. -> {output}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sfm-hf merge-statistics",
        description="Merge Stage I statistics computed on disjoint shards of a dataset (other machines, other "
        "sites, new data) into exactly what one pass over their union gives.",
    )
    parser.add_argument("folders", nargs="+", help="the statistics/ folder of each shard's Stage I run")
    parser.add_argument("--output", required=True, help="new folder for the merged statistics/")
    parser.add_argument(
        "--allow-disjoint-classes", action="store_true",
        help="merge shards that share no class name (by default refused as a likely naming mismatch)",
    )
    arguments = parser.parse_args(argv)
    try:
        statistics = merge_statistics(
            arguments.folders, arguments.output, allow_disjoint_classes=arguments.allow_disjoint_classes
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(statistics, Path(arguments.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
