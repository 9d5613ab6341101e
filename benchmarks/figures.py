"""The docs' pictures, drawn from real run folders (never from typed-in numbers).

    python benchmarks/figures.py --demo outputs/demo --out docs/assets      # a demo run (make demo's output_dir)
    python benchmarks/figures.py --real outputs/real --out docs/assets      # make bench-real's run folders

From a single run (``--demo``):
  ``pipeline.png``            real images -> class statistics -> synthetic images -> the three Hub folders;
  ``demo-synthetic.png``      the start (step 0, when the run kept snapshots) and the final synthetic images;
  ``demo-accuracy.png``       the Stage III table (same-backbone rows) as a bar chart, mean ± std;
  ``demo-time-to-quality.png`` accuracy against seconds of distillation (runs with ``evaluate.time_to_quality``).
From ``make bench-real``'s folders (``--real``; its ``summary.json`` names the runs):
  ``real-synthetic-<network>-ipc<k>.png``       every start and LGM of the cell, one row each;
  ``real-accuracy.png``                         Table 2 (test split, same network) for every cell;
  ``real-time-to-quality-<network>-ipc<k>.png`` each cell's curves against the Centroids row (validation split);
  ``--prefix`` replaces ``real`` (another bench's folders beside these in ``--out``).
Each picture is small (about 100 dpi, 10 classes at most) so it can be committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sfm_hf.evaluation.time_to_quality import plot_curves
from sfm_hf.names import short_name
from sfm_hf.report import load_records, row_key, row_label
from sfm_hf.snapshots import read_snapshots
from sfm_hf.visualize import pyplot, save_figure

# benchmarks/ (when loaded by path, as the tests do): the bench's own tables pool seeds the same way.
sys.path.insert(0, str(Path(__file__).parent))
from harness import pooled  # noqa: E402

MAX_CLASSES = 10
DPI = 100
# The outputs of export that the pipeline picture names, in the order the stage writes them.
HUB_FOLDERS = (("synthetic/", "dataset"), ("model/", "classifier bundle"), ("statistics/", "statistics"))


def first_per_class(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The first image of each of the first ``MAX_CLASSES`` classes, in class order."""
    classes = sorted(set(labels.tolist()))[:MAX_CLASSES]
    picked = [int((labels == label).nonzero()[0]) for label in classes]
    return images[picked].float().clamp(0, 1), classes


def read_synthetic(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(run / "synthetic" / "images.safetensors")
    return tensors["images"], tensors["labels"]


def class_names(run: Path) -> list[str]:
    return json.loads((run / "synthetic" / "synthetic.json").read_text()).get("class_names") or []


def image_rows(rows: list[tuple[str, torch.Tensor, torch.Tensor]], names: list[str], path: Path, title: str) -> Path:
    """One row per labelled image set, one column per class (its first image)."""
    plt = pyplot()
    picked = [(label, *first_per_class(images, labels)) for label, images, labels in rows]
    columns = max(len(classes) for _, _, classes in picked)
    figure, axes = plt.subplots(len(picked), columns, figsize=(0.95 * columns + 1.6, 1.05 * len(picked) + 0.5),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for row, (label, images, classes) in enumerate(picked):
        for column, (image, klass) in enumerate(zip(images, classes)):
            axes[row, column].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            if row == 0:
                axes[row, column].set_title(names[klass][:10] if klass < len(names) else str(klass), fontsize=8)
        axes[row, 0].text(-0.15, 0.5, label, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0.1, 0, 1, 1))
    return save_figure(figure, path, dpi=DPI)


def same_backbone_records(records: list[dict]) -> list[dict]:
    """The Table 2 rows: evaluated on the network that distilled (or, for real baselines, chose) the images."""
    return [record for record in records if short_name(record.get("eval_backbone") or "")
            == short_name(record.get("distill_backbone") or record.get("eval_backbone") or "")
            and record.get("mean") is not None]


def pooled_over_seeds(records: list[dict]) -> list[dict]:
    """One record per row from the final runs of several distillation seeds: their trials pooled (mean and
    population std over seeds x trials, as the bench's tables)."""
    rows: dict[tuple, dict] = {}
    for record in records:
        key = (record["train_set"], record["mode"], record.get("eval_backbone"), record.get("distill_backbone"))
        if key in rows:
            rows[key]["per_trial"] = rows[key]["per_trial"] + list(record["per_trial"])
        else:
            rows[key] = {**record, "per_trial": list(record["per_trial"])}
    for record in rows.values():
        summary = pooled({0: record["per_trial"]})
        record["mean"], record["std"] = summary["mean"], summary["std"]
    return list(rows.values())


def accuracy_bars(cells: list[tuple[str, list[dict]]], path: Path, title: str) -> Path:
    """Grouped horizontal bars: one group per row of the table, one bar per cell, mean ± std (%)."""
    plt = pyplot()
    labels = []
    for _, records in cells:
        for record in sorted(records, key=row_key):
            if row_label(record) not in labels:
                labels.append(row_label(record))
    height = 0.8 / len(cells)
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(labels) * max(1, len(cells) / 2) + 1.2))
    for index, (name, records) in enumerate(cells):
        by_label = {row_label(record): record for record in records}
        positions = [row - 0.4 + height * (index + 0.5) for row in range(len(labels))]
        means = [100 * by_label[label]["mean"] if label in by_label else 0.0 for label in labels]
        spreads = [100 * by_label[label].get("std", 0.0) if label in by_label else 0.0 for label in labels]
        bars = axis.barh(positions, means, height=height, xerr=spreads, label=name, capsize=2)
        for bar, label, mean, spread in zip(bars, labels, means, spreads):
            if label in by_label:
                axis.text(mean + spread + 1, bar.get_y() + bar.get_height() / 2, f"{mean:.1f}", va="center", fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 105)
    axis.set_xlabel("accuracy (%)")
    axis.grid(axis="x", alpha=0.3)
    if len(cells) > 1:
        axis.legend(fontsize=7, loc="lower right")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, dpi=DPI)


def pipeline(run: Path, path: Path) -> Path:
    """Real images -> class means -> synthetic images -> Hub folders, from one run's files."""
    import yaml

    from sfm_hf.data import load_rgb, open_split

    config = yaml.safe_load((run / "config.yaml").read_text())
    source = open_split(config["dataset"], config.get("train_split", "train"), config_name=config.get("dataset_config"),
                        image_column=config.get("image_column"), label_column=config.get("label_column"),
                        streaming=False)
    labels = torch.tensor(source.dataset[source.label_column])
    if source.label_to_id is not None:
        labels = torch.tensor([source.label_to_id[value] for value in labels.tolist()])
    synthetic, synthetic_labels = read_synthetic(run)
    size = synthetic.shape[-1]
    rows = [int((labels == label).nonzero()[0]) for label in sorted(set(labels.tolist()))[:MAX_CLASSES]]
    real = torch.stack([torch.from_numpy(np.array(load_rgb(source.dataset[row][source.image_column])
                                                  .resize((size, size)))).permute(2, 0, 1).float() / 255
                        for row in rows])
    means = load_file(run / "statistics" / "statistics.safetensors")["class_means"][:MAX_CLASSES].float()
    final, _ = first_per_class(synthetic, synthetic_labels)

    plt = pyplot()
    figure, panels = plt.subplots(1, 4, figsize=(10, 2.4), gridspec_kw={"width_ratios": (1, 1.1, 1, 0.8)})
    titles = ("real images (train split)", "Stage I: class means of the frozen\nbackbone's features, a row per class",
              "Stage II: synthetic images\n(one per class)", "export: Hub folders")
    for axis, title in zip(panels, titles):
        axis.set_title(title, fontsize=8)
    panels[0].imshow(_mosaic(real), interpolation="nearest")
    panels[1].imshow(means.numpy(), aspect="auto", cmap="coolwarm", interpolation="nearest")
    panels[1].set_xlabel(f"feature (D = {means.shape[1]})", fontsize=7)
    panels[1].set_yticks([])
    panels[1].tick_params(labelsize=6)
    panels[2].imshow(_mosaic(final), interpolation="nearest")
    for axis in (panels[0], panels[2], panels[3]):
        axis.axis("off")
    for row, (folder, what) in enumerate(HUB_FOLDERS):
        panels[3].text(0.0, 0.85 - 0.33 * row, f"{folder}\n  {what}", fontsize=8, family="monospace", va="center",
                       transform=panels[3].transAxes)
    figure.tight_layout(w_pad=3)
    for left, right in zip(panels[:-1], panels[1:]):
        middle = (left.get_position().x1 + right.get_position().x0) / 2
        figure.text(middle, left.get_position().y0 + left.get_position().height / 2, "→", fontsize=16,
                    ha="center", va="center")
    return save_figure(figure, path, dpi=DPI)


def _mosaic(images: torch.Tensor, columns: int = 5) -> np.ndarray:
    """Images [N, 3, H, W] as one [rows·H, columns·W, 3] array with a 1-px white gap."""
    count, _, height, width = images.shape
    rows = -(-count // columns)
    canvas = torch.ones(3, rows * (height + 1) - 1, columns * (width + 1) - 1)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        canvas[:, top:top + height, left:left + width] = image
    return canvas.permute(1, 2, 0).numpy()


def demo_figures(run: Path, out: Path) -> list[Path]:
    written = [pipeline(run, out / "pipeline.png")]
    images, labels = read_synthetic(run)
    metadata = json.loads((run / "synthetic" / "synthetic.json").read_text())
    method = metadata.get("method", "sfm").upper()
    rows = []
    snapshots = read_snapshots(run / "synthetic") if (run / "synthetic" / "snapshots").is_dir() else []
    if snapshots and snapshots[0].step == 0:
        start, start_labels = snapshots[0].load()
        rows.append((f"start ({metadata.get('distill', {}).get('init', 'step 0')})", start, start_labels))
    rows.append((f"{method}, {metadata.get('iterations')} steps", images, labels))
    written.append(image_rows(rows, class_names(run), out / "demo-synthetic.png",
                              "Synthetic images, one per class (first row: the start, step 0)" if len(rows) > 1
                              else "Synthetic images, one per class"))
    records = same_backbone_records(load_records([run]))
    written.append(accuracy_bars([(short_name(records[0]["eval_backbone"]), records)], out / "demo-accuracy.png",
                                 "Stage III on the eval split: accuracy (%), mean ± std over trials"))
    curves = run / "evaluation" / "time_to_quality.json"
    if curves.is_file():
        result = json.loads(curves.read_text())
        written.append(plot_curves(result["curves"], result["flat"], out / "demo-time-to-quality.png",
                                   f"Accuracy on the {result['eval_split']} split against seconds of distillation"))
    return written


def real_figures(runs: Path, out: Path, prefix: str = "real") -> list[Path]:
    summary = json.loads((runs / "summary.json").read_text())
    written, cells = [], []
    for network, per_ipc in summary.items():
        for ipc_key, entry in per_ipc.items():
            cell = f"{network}-{ipc_key}"
            rows = []
            for key in entry["selection"]:
                run = runs / network / f"{ipc_key}-{key}"
                images, labels = read_synthetic(run)
                method, _, init = key.rpartition("-") if key.startswith("lgm-") else ("sfm", "", key)
                chosen = " (chosen)" if key == entry["chosen_init"] else ""
                rows.append((f"{method.upper()} from {init}{chosen}", images, labels))
            if rows:
                any_run = runs / network / f"{ipc_key}-{next(iter(entry['selection']))}"
                written.append(image_rows(rows, class_names(any_run), out / f"{prefix}-synthetic-{cell}.png",
                                          f"{network}, {ipc_key.replace('ipc', 'ipc ')}: final images of each start"))
            if "time_to_quality" in entry:
                timed = entry["time_to_quality"]
                flat = [{"train_set": "centroids", "mode": "vanilla", "eval_backbone": curve["eval_backbone"],
                         "mean": timed["centroids"]} for curve in timed["curves"][:1]]
                written.append(plot_curves(timed["curves"], flat, out / f"{prefix}-time-to-quality-{cell}.png",
                                           f"MNIST, {network}, {ipc_key.replace('ipc', 'ipc ')}: validation accuracy "
                                           "against seconds of distillation"))
            finals = [Path(run) for run in entry.get("final", {}).values()]
            if finals and all((run / "results.json").is_file() for run in finals):
                cells.append((f"{network}, {ipc_key.replace('ipc', 'ipc ')}",
                              same_backbone_records(pooled_over_seeds(load_records(finals)))))
    if cells:
        written.append(accuracy_bars(cells, out / f"{prefix}-accuracy.png",
                                     "MNIST test split, distilled and evaluated on the same network: accuracy (%)"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="A run's output_dir (make demo: outputs/demo).")
    parser.add_argument("--real", type=Path, help="make bench-real's run folder (outputs/real), with summary.json.")
    parser.add_argument("--out", type=Path, default=Path("docs/assets"), help="Where the PNGs go.")
    parser.add_argument("--prefix", default="real",
                        help="First part of --real's file names, so that two benches' pictures can share --out "
                        "(make bench-real-dinov2's: real-dinov2).")
    args = parser.parse_args(argv)
    if not (args.demo or args.real):
        parser.error("give --demo RUN, --real RUNS or both")
    written = []
    if args.demo:
        written += demo_figures(args.demo, args.out)
    if args.real:
        written += real_figures(args.real, args.out, args.prefix)
    for path in written:
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
