"""Tables and plots of Stage III results, laid out like the paper's.

- Table 2 (same model): rows Random / Centroids / Neighbors / LGM / SFM / SFM+CI / Full dataset,
  one column per backbone used both to distil and to evaluate.
- Table 4 (across models): for each distillation backbone evaluated on several backbones, a
  block of rows x eval backbones.
- Table 5 / Fig. 3 (strategies): vanilla, JT, ST (with and without inherited parameters), CI and
  soft labels on the synthetic set, when those modes were run.
- ``plot_accuracy_curves``: accuracy vs training iteration, vanilla vs CI (vs KD), Fig. 3-like.
- ``plot_flow_pca``: statistical vs synthetic flows in a PCA plane, Fig. 5-like.

Tables of several runs (one per distillation backbone) are merged from the command line:
``python -m sfm_hf.report runs/cross-* --output cross_model.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from .layout import CURVES_PLOT, EVALUATION_DIR, FLOW_PLOT, RunLayout
from .names import short_name
from .objectives import class_centres, flow_cosine, statistical_flow
from .registry import DISTILL_METHODS, EVALUATION_MODES, parse_mode
from .utils import write_text_atomically
from .visualize import pyplot, save_figure

Record = dict[str, Any]

BASE_NAMES = {"random": "Random", "centroids": "Centroids",
              **{method.name: method.label for method in DISTILL_METHODS.values()}, "full_dataset": "Full dataset"}
# Paper order: real baselines, then distilled sets (in the registry's order), then the references.
BASE_ORDER = ["random", "centroids", *(f"neighbors_{name}" for name in DISTILL_METHODS), *DISTILL_METHODS,
              "full_dataset"]
# Rows of Tables 2 and 4: the modes with a main-table label, then the golden classifier.
MAIN_MODES = (*(mode.name for mode in EVALUATION_MODES.values() if mode.main_table_suffix is not None), "golden")


def _base_label(train_set: str) -> str:
    if train_set.startswith("neighbors_"):
        method = train_set.removeprefix("neighbors_")
        return f"Neighbors ({BASE_NAMES.get(method, method.upper())})"
    return BASE_NAMES.get(train_set, train_set)


def row_label(record: Record) -> str:
    """What a row of Table 2/4 calls a (train set, mode): 'SFM', 'SFM+CI', 'Golden classifier', ..."""
    mode = record["mode"]
    if mode == "golden":
        return "Golden classifier (full data)"
    base = _base_label(record["train_set"])
    entry, _ = parse_mode(mode)
    if entry is not None and entry.main_table_suffix is not None:
        return base + entry.main_table_suffix
    return f"{base} [{mode}]"


def row_key(record: Record) -> tuple[int, str, int]:
    """Where a record's row sits in Table 2/4: the train set's place, then the mode's."""
    train_set = record["train_set"]
    position = BASE_ORDER.index(train_set) if train_set in BASE_ORDER else len(BASE_ORDER) - 1
    mode = record["mode"]
    return position, train_set, MAIN_MODES.index(mode) if mode in MAIN_MODES else len(MAIN_MODES)


def cell(record: Record | None) -> str:
    if record is None:
        return "–"
    return f"{100 * record['mean']:.1f} ± {100 * record['std']:.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _grid(records: list[Record], columns: list[str], column_of, label_of, key_of) -> str:
    """Rows labelled by ``label_of`` (ordered by ``key_of``), one column per value of ``column_of``, + average."""
    table: dict[str, dict[str, Record]] = {}
    keys: dict[str, Any] = {}
    for record in records:
        label = label_of(record)
        table.setdefault(label, {})[column_of(record)] = record
        keys[label] = min(keys.get(label, key_of(record)), key_of(record))
    with_average = len(columns) > 1
    header = ["Train set"] + [short_name(column) for column in columns] + (["Average"] if with_average else [])
    rows = []
    for label in sorted(table, key=lambda name: (keys[name], name)):
        cells = [table[label].get(column) for column in columns]
        row = [label] + [cell(item) for item in cells]
        if with_average:
            present = [item for item in cells if item is not None]
            row.append(f"{100 * sum(item['mean'] for item in present) / len(present):.1f}"
                       if len(present) == len(cells) else "–")
        rows.append(row)
    return _markdown(header, rows)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def same_model_table(records: list[Record]) -> str | None:
    """Table 2: distilled and evaluated on the same backbone, one column per backbone."""
    chosen = [r for r in records if r["eval_backbone"] == r["distill_backbone"] and r["mode"] in MAIN_MODES]
    if not chosen:
        return None
    columns = _unique(r["distill_backbone"] for r in chosen)
    return _grid(chosen, columns, lambda r: r["distill_backbone"], row_label, row_key)


def cross_model_tables(records: list[Record]) -> list[tuple[str, str]]:
    """Table 4: for each distillation backbone evaluated on several backbones, (distill backbone, table)."""
    tables = []
    for distill in _unique(r["distill_backbone"] for r in records):
        chosen = [r for r in records if r["distill_backbone"] == distill and r["mode"] in MAIN_MODES
                  and r["mode"] != "golden"]
        columns = _unique(r["eval_backbone"] for r in chosen)
        if len(columns) > 1:
            tables.append((distill, _grid(chosen, columns, lambda r: r["eval_backbone"], row_label, row_key)))
    return tables


def _strategy_label(record: Record) -> str:
    entry, _ = parse_mode(record["mode"])
    return entry.label.format(alpha=record["mode"].partition("-")[2])


def _strategy_key(record: Record) -> tuple[int, str]:
    entry, _ = parse_mode(record["mode"])
    return list(EVALUATION_MODES).index(entry.name), record["mode"]


def strategy_tables(records: list[Record]) -> list[tuple[str, str, str]]:
    """Table 5 / Fig. 3: training strategies on each synthetic set, when any beyond vanilla and CI ran."""
    tables = []
    for distill in _unique(r["distill_backbone"] for r in records):
        for train_set in _unique(r["train_set"] for r in records if r["distill_backbone"] == distill):
            chosen = [r for r in records if r["distill_backbone"] == distill and r["train_set"] == train_set
                      and parse_mode(r["mode"])[0] is not None]
            if all(parse_mode(r["mode"])[0].main_table_suffix is not None for r in chosen):
                continue
            columns = _unique(r["eval_backbone"] for r in chosen)
            table = _grid(chosen, columns, lambda r: r["eval_backbone"], _strategy_label, _strategy_key)
            tables.append((distill, train_set, table))
    return tables


def paper_tables(records: list[Record]) -> str:
    """Every table the records support, as markdown (accuracy in %, mean ± population std over trials)."""
    parts = []
    table = same_model_table(records)
    if table is not None:
        parts.append("Table 2 style: distilled and evaluated on the same backbone (accuracy %, mean ± std)\n\n" + table)
    for distill, table in cross_model_tables(records):
        parts.append(f"Table 4 style: distilled with {short_name(distill)}, evaluated on each backbone\n\n" + table)
    for distill, train_set, table in strategy_tables(records):
        parts.append(f"Table 5 style: strategies on {_base_label(train_set)} images distilled with "
                     f"{short_name(distill)}\n\n" + table)
    return "\n\n".join(parts)


def write_markdown(records: list[Record], path: Path, *, title: str = "Results") -> Path:
    trials = sorted({r["trials"] for r in records if r["mode"] != "golden"})
    lines = [
        f"# {title}",
        "",
        "Accuracy (%) of the final training iteration on the eval split; mean ± population std over "
        f"{'/'.join(map(str, trials)) or 1} trial(s). Nothing was selected on the eval split.",
        "",
        paper_tables(records),
        "",
    ]
    for picture, caption in ((f"{EVALUATION_DIR}/{CURVES_PLOT}", "accuracy vs iteration"),
                             (f"{EVALUATION_DIR}/{FLOW_PLOT}", "statistical vs synthetic flows")):
        if (path.parent / picture).is_file():
            lines += [f"![{caption}]({picture})", ""]
    write_text_atomically(path, "\n".join(lines))
    return path


def plot_accuracy_curves(records: list[Record], path: Path) -> Path | None:
    """Accuracy vs iteration of every mode on each synthetic set, one panel per eval backbone (Fig. 3-like).

    The curve points were scored on the eval split for this picture only.
    """
    curves = [r for r in records if r.get("curve") and r["train_set"] in DISTILL_METHODS]
    if not curves:
        return None
    plt = pyplot()
    panels = _unique(r["eval_backbone"] for r in curves)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for axis, backbone in zip(axes[0], panels):
        for record in (r for r in curves if r["eval_backbone"] == backbone):
            mode, _ = parse_mode(record["mode"])
            style = mode.curve_style if mode is not None else ":"
            axis.plot(record["curve"]["iterations"], [100 * value for value in record["curve"]["mean"]], style,
                      label=f"{row_label(record)} ({cell(record)})")
        for record in records:
            if record["train_set"] == "full_dataset" and record["eval_backbone"] == backbone:
                axis.axhline(100 * record["mean"], color="grey", linewidth=0.8,
                             linestyle="-." if record["mode"] == "golden" else ":")
        axis.set_title(f"eval: {short_name(backbone)}", fontsize=10)
        axis.set_xlabel("training iteration")
        axis.set_ylabel("eval accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Accuracy vs iteration (grey: full-dataset probe / golden classifier)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def _pca_basis(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centre = points.mean(0, keepdim=True)
    _, _, vectors = torch.linalg.svd(points - centre, full_matrices=False)
    return centre, vectors[:2].T


def _arrows(axis, starts: torch.Tensor, ends: torch.Tensor, colours: list, style: str) -> None:
    for start, end, colour in zip(starts.tolist(), ends.tolist(), colours):
        axis.annotate("", xy=end, xytext=start,
                      arrowprops=dict(arrowstyle="->", color=colour, linestyle=style, linewidth=1.2))


def _fit_limits(axis, points: torch.Tensor) -> None:
    # annotate() arrows do not enter matplotlib's autoscaling.
    low, high = points.min(0).values, points.max(0).values
    margin = 0.08 * (high - low).clamp(min=1e-6)
    axis.set_xlim(float(low[0] - margin[0]), float(high[0] + margin[0]))
    axis.set_ylim(float(low[1] - margin[1]), float(high[1] + margin[1]))


def plot_flow_pca(
    class_means: torch.Tensor,
    class_counts: torch.Tensor,
    synthetic: dict[str, tuple[torch.Tensor, torch.Tensor]],
    class_names: list[str],
    path: Path,
    *,
    non_target: str = "class_mean",
    max_classes: int = 20,
) -> Path:
    """Fig. 5: the statistical flow of each class (solid) against the synthetic flow (dashed), up to 20 classes.

    ``synthetic`` maps a set's name to its phi_d features and labels. Left panel: in feature space
    (PCA of all drawn centres), class centre mu_c -> non-target centre nu_c and synthetic centre ->
    synthetic non-target centre (the mean of the other synthetic class centres). Right panel: the
    same flow vectors from a common origin (PCA of the flows), where their directions compare
    directly. The cosine in the title is Eq. 9's, over all classes.
    """
    plt = pyplot()
    num_classes = len(class_means)
    shown = torch.linspace(0, num_classes - 1, min(max_classes, num_classes)).round().long().unique()
    colours = [plt.get_cmap("tab20")(position % 20) for position in range(len(shown))]
    means = class_means.double()
    statistical = statistical_flow(class_means, class_counts, non_target).double()
    figure, axes = plt.subplots(len(synthetic), 2, figsize=(11, 4.8 * len(synthetic)), squeeze=False)
    for row, (name, (features, labels)) in zip(axes, synthetic.items()):
        centres = class_centres(features.double(), labels, num_classes)
        flow = statistical_flow(centres, torch.ones(num_classes), "class_mean").double()
        starts = torch.cat([means[shown], centres[shown]])
        ends = starts + torch.cat([statistical[shown], flow[shown]])
        centre, basis = _pca_basis(torch.cat([starts, ends]))
        place, direction = row
        projected_starts, projected_ends = (starts - centre) @ basis, (ends - centre) @ basis
        count = len(shown)
        _arrows(place, projected_starts[:count], projected_ends[:count], colours, "-")
        _arrows(place, projected_starts[count:], projected_ends[count:], colours, "--")
        for position, label in enumerate(shown.tolist()):
            x, y = projected_starts[position].tolist()
            place.scatter([x], [y], color=colours[position], s=12)
            place.annotate(class_names[label][:12], (x, y), fontsize=6, color=colours[position])
        _fit_limits(place, torch.cat([projected_starts, projected_ends]))
        cosine = float(flow_cosine(statistical, flow))
        place.set_title(f"{_base_label(name)}: centres and flows in feature space", fontsize=9)
        vectors = torch.cat([statistical[shown], flow[shown]])
        _, flow_basis = _pca_basis(torch.cat([vectors, -vectors]))
        tips = vectors @ flow_basis
        origin = torch.zeros_like(tips)
        _arrows(direction, origin[:count], tips[:count], colours, "-")
        _arrows(direction, origin[count:], tips[count:], colours, "--")
        for position, label in enumerate(shown.tolist()):
            x, y = tips[position].tolist()
            direction.annotate(class_names[label][:12], (x, y), fontsize=6, color=colours[position])
        _fit_limits(direction, torch.cat([origin, tips]))
        direction.set_title(f"flows from one origin; cos(F*, F^s) = {cosine:.3f} over all {num_classes} classes",
                            fontsize=9)
        for axis in row:
            axis.set_xlabel("PC 1")
            axis.set_ylabel("PC 2")
    figure.suptitle(f"Statistical flow (solid) vs synthetic flow (dashed), {len(shown)} classes", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=110)


def load_records(paths: Iterable[str | Path]) -> list[Record]:
    """Records of several runs: each path is a run's output_dir or a results.json file."""
    records = []
    for path in map(Path, paths):
        file = RunLayout(path).results_file if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No results.json at {path}: run the 'evaluate' stage there first.")
        records.extend(json.loads(file.read_text()))
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfm_hf.report",
        description="Merge the results.json of several runs (e.g. one per distillation backbone) into "
        "Table 2 / Table 4 style markdown.",
    )
    parser.add_argument("runs", nargs="+", help="output_dir of each run, or its results.json")
    parser.add_argument("--output", help="write the markdown here as well as printing it")
    parser.add_argument("--plot", help="also write the accuracy-vs-iteration plot of all runs to this PNG")
    arguments = parser.parse_args(argv)
    try:
        records = load_records(arguments.runs)
    except FileNotFoundError as error:
        parser.error(str(error))
    text = paper_tables(records)
    print(text)
    if arguments.output:
        write_markdown(records, Path(arguments.output), title="Results of " + ", ".join(arguments.runs))
    if arguments.plot:
        plot_accuracy_curves(records, Path(arguments.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
