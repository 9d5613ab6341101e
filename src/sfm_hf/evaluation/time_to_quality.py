"""Time-to-quality (``evaluate.time_to_quality``): accuracy against seconds of distillation.

Every snapshot of an evaluated synthetic set (``distill.snapshot_every``, :mod:`sfm_hf.snapshots`) is scored by
the very trainings Stage III runs on the final set: the same jobs (trials, eval backbones, modes, seeds, view
banks) through :func:`sfm_hf.evaluation.run_jobs` (``score_snapshots`` there; this module makes the snapshots'
train sets and the outputs). The last snapshot holds the final images, so the curve's last
point is the final table's row to the digit (each curve records that row's mean beside it). The real train sets
(Random, Centroids, the full-dataset references) are drawn as flat lines.

Writes ``evaluation/time_to_quality.json`` (curves and flat lines), ``.md`` (a table per curve) and ``.png`` (one
panel per eval backbone). :func:`plot_curves` and :func:`first_reaching` also serve the real-data benchmark, which
draws the curves of several runs in one picture.
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from ..config import Config
from ..layout import RunLayout
from ..names import short_name
from ..registry import DISTILL_METHODS
from ..report import REAL_DATA_LABEL, SAME_NETWORK_MARK, reads_real_eval_data, same_network_ci, table_notes
from ..snapshots import Snapshot, read_snapshots
from ..utils import write_text_atomically
from ..visualize import pyplot, save_figure
from .records import JobResult
from .train_sets import SyntheticSet, TrainSet

logger = get_logger(__name__)

TIME_TO_QUALITY = "time_to_quality"


@dataclass
class SnapshotSource:
    """A synthetic set whose snapshots are scored: its final train set and its snapshots in step order."""

    train_set: TrainSet
    synthetic: SyntheticSet
    snapshots: list[Snapshot]

    def snapshot_sets(self) -> list[TrainSet]:
        """One train set per snapshot (``<name>@<step>``), with the final set's modes."""
        return [self._snapshot_set(snapshot) for snapshot in self.snapshots]

    def _snapshot_set(self, snapshot: Snapshot) -> TrainSet:
        load = functools.lru_cache(maxsize=1)(snapshot.load)
        return TrainSet(snapshot_set_name(self.train_set.name, snapshot.step), self.train_set.modes,
                        self.train_set.ipc, lambda trial: load())


def snapshot_set_name(name: str, step: int) -> str:
    return f"{name}@{step}"


def snapshot_sources(train_sets: list[TrainSet], synthetic: dict[str, SyntheticSet],
                     announce: bool) -> list[SnapshotSource]:
    """The evaluated synthetic sets that have snapshots (``announce``: log those that have none)."""
    sources = []
    for train_set in train_sets:
        if train_set.name in synthetic:
            chosen = synthetic[train_set.name]
            snapshots = read_snapshots(chosen.folder)
            if snapshots and snapshots[-1].step == chosen.metadata["iterations"]:
                sources.append(SnapshotSource(train_set, chosen, snapshots))
            elif announce:
                why = (f"its snapshots end at step {snapshots[-1].step}, its images at {chosen.metadata['iterations']}"
                       if snapshots else "it has no snapshots (distill.snapshot_every was 0 when it was made)")
                logger.warning(f"evaluate.time_to_quality: no curve for {train_set.name}: {why} ({chosen.folder}).")
    return sources


def write_curves(config: Config, sources: list[SnapshotSource], eval_backbones: list[str], results: list[JobResult],
                 records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The curves of ``sources`` from the snapshots' trainings (``results``) beside the final ``records``; writes
    evaluation/time_to_quality.{json,md,png} and returns what the json holds."""
    curves = [_curve(source, eval_backbone, mode, results, records)
              for source in sources for eval_backbone in eval_backbones for mode in source.train_set.modes]
    flat = [{**{key: record[key] for key in ("train_set", "eval_backbone", "mode", "mean", "std")},
             **_honesty(record)}
            for record in records if record["train_set"] not in DISTILL_METHODS and record.get("mean") is not None]
    result = {"eval_split": config.eval_split, "scoring_seconds": round(seconds, 3), "curves": curves, "flat": flat}
    folder = RunLayout(config.output_dir).evaluation_dir
    write_outputs(folder, result)
    logger.info(f"Stage III: time to quality of {sum(len(source.snapshots) for source in sources)} snapshots scored "
                f"in {seconds:.1f} s -> {folder / (TIME_TO_QUALITY + '.md')}")
    return result


def _curve(source: SnapshotSource, eval_backbone: str, mode: str, results: list[JobResult],
           records: list[dict[str, Any]]) -> dict[str, Any]:
    name = source.train_set.name
    points = []
    for snapshot in source.snapshots:
        trials = sorted((result for result in results
                         if result.job.train_set == snapshot_set_name(name, snapshot.step)
                         and result.job.eval_backbone == eval_backbone and result.job.mode == mode),
                        key=lambda result: result.job.trial)
        values = [result.accuracy for result in trials]
        # The same arithmetic as the final record's mean, so the last point equals the row exactly.
        points.append({"step": snapshot.step, "seconds": snapshot.seconds, "mean": sum(values) / len(values),
                       "per_trial": values})
    row = next((record for record in records if record["train_set"] == name
                and record["eval_backbone"] == eval_backbone and record["mode"] == mode), None)
    return {"train_set": name, "init": source.synthetic.metadata.get("distill", {}).get("init"),
            "eval_backbone": eval_backbone, "mode": mode, "points": points,
            "final_row_mean": None if row is None else row["mean"], **({} if row is None else _honesty(row))}


def _honesty(record: dict[str, Any]) -> dict[str, Any]:
    """What a row read of real data through its eval backbone, and whether it is same-network CI: the curve or line
    drawn from it carries the same label and marker as the row (report.py)."""
    return {"real_eval_data": record.get("real_eval_data", []), "same_network": record.get("same_network", False)}


def _label_marks(entry: dict[str, Any]) -> str:
    return ((REAL_DATA_LABEL if reads_real_eval_data(entry) else "")
            + (f" {SAME_NETWORK_MARK}" if same_network_ci(entry) else ""))


def curve_label(curve: dict[str, Any]) -> str:
    start = f" from {curve['init']}" if curve.get("init") else ""
    return f"{curve.get('label') or curve['train_set']}{start} ({curve['mode']}){_label_marks(curve)}"


def flat_label(flat: dict[str, Any]) -> str:
    return f"{flat['train_set']} {flat['mode']}{_label_marks(flat)}"


def first_reaching(curve: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The earliest point of ``curve`` whose mean accuracy is at least ``target``; None if none is."""
    return next((point for point in curve["points"] if point["mean"] >= target), None)


def best_point(curve: dict[str, Any]) -> dict[str, Any]:
    """The point of highest accuracy (the earliest of equals)."""
    return max(curve["points"], key=lambda point: (point["mean"], -point["seconds"]))


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Time to quality ({result['eval_split']} split)", ""]
    for curve in result["curves"]:
        lines += [f"## {curve_label(curve)} -> {short_name(curve['eval_backbone'])}", "",
                  "| step | seconds | accuracy (%) |", "|---:|---:|---:|"]
        lines += [f"| {point['step']} | {point['seconds']:.1f} | {100 * point['mean']:.1f} |"
                  for point in curve["points"]]
        if curve["final_row_mean"] is not None:
            lines += ["", f"Final table row: {100 * curve['final_row_mean']:.1f} %."]
        lines.append("")
    if result["flat"]:
        lines += ["Real train sets and references: " + "; ".join(
            f"{flat_label(flat)} -> {short_name(flat['eval_backbone'])} {100 * flat['mean']:.1f} %"
            for flat in result["flat"]) + ".", ""]
    lines += [line for note in table_notes(result["curves"] + result["flat"]) for line in (note, "")]
    return "\n".join(lines)


def plot_curves(curves: list[dict[str, Any]], flat: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Accuracy (%) against seconds of distillation, one panel per eval backbone; ``flat`` records as lines."""
    if not curves:
        return None
    plt = pyplot()
    panels = list(dict.fromkeys(curve["eval_backbone"] for curve in curves))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, backbone in zip(axes[0], panels):
        for curve in (curve for curve in curves if curve["eval_backbone"] == backbone):
            axis.plot([point["seconds"] for point in curve["points"]],
                      [100 * point["mean"] for point in curve["points"]], marker=".", label=curve_label(curve))
        for line, style in zip((flat_ for flat_ in flat if flat_["eval_backbone"] == backbone),
                               itertools.cycle(("--", ":", "-.", (0, (1, 3)), (0, (5, 5))))):
            axis.axhline(100 * line["mean"], color="grey", linewidth=0.9, linestyle=style,
                         label=f"{flat_label(line)} ({100 * line['mean']:.1f})")
        axis.set_title(f"eval: {short_name(backbone)}", fontsize=10)
        axis.set_xlabel("seconds of distillation")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def write_outputs(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / f"{TIME_TO_QUALITY}.json", json.dumps(result, indent=2))
    write_text_atomically(folder / f"{TIME_TO_QUALITY}.md", markdown(result))
    plot_curves(result["curves"], result["flat"], folder / f"{TIME_TO_QUALITY}.png",
                f"Time to quality ({result['eval_split']} split; grey: real train sets and references)")
