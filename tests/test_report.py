import json

import torch

from sfm_hf.report import load_records, main, paper_tables, plot_accuracy_curves, plot_flow_pca, row_label


def record(train_set, mode, mean, std=0.01, distill="org/dino", eval_backbone="org/dino", curve=None):
    entry = {"train_set": train_set, "distill_backbone": distill, "eval_backbone": eval_backbone, "mode": mode,
             "mean": mean, "std": std, "per_trial": [mean], "trials": 5, "ipc": 1, "iterations": 1000, "seconds": 1.0}
    if curve:
        entry["curve"] = {"iterations": [0, 500, 1000], "mean": curve}
    return entry


def table_rows(text):
    return [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:]


def test_table_2_has_the_paper_rows_in_the_paper_order():
    records = [
        record("full_dataset", "vanilla", 0.952), record("sfm", "ci", 0.951), record("random", "vanilla", 0.748),
        record("sfm", "vanilla", 0.906), record("lgm", "vanilla", 0.915), record("centroids", "vanilla", 0.869),
        record("neighbors_sfm", "vanilla", 0.88), record("neighbors_lgm", "vanilla", 0.86),
        record("full_dataset", "golden", 0.95, std=0.0), record("sfm", "kd-0.5", 0.93),
    ]
    text = paper_tables(records)
    table_2 = text.split("Table 5")[0]
    assert table_rows(table_2) == ["Random", "Centroids", "Neighbors (LGM)", "Neighbors (SFM)", "LGM", "SFM",
                                   "SFM+CI", "Full dataset", "Golden classifier (full data)"]
    assert "| SFM+CI | 95.1 ± 1.0 |" in table_2
    assert "Table 4" not in text
    assert "| Soft labels (α=0.5) | 93.0 ± 1.0 |" in text


def test_several_eval_backbones_give_a_table_4_block_with_averages():
    records = [record("sfm", "vanilla", 0.8, eval_backbone=name) for name in ("org/dino", "org/clip")]
    records += [record("sfm", "ci", 0.9, eval_backbone="org/dino"), record("sfm", "ci", 0.7, eval_backbone="org/clip")]
    text = paper_tables(records)
    assert "Table 4 style: distilled with dino" in text
    assert "| Train set | dino | clip | Average |" in text
    assert "| SFM+CI | 90.0 ± 1.0 | 70.0 ± 1.0 | 80.0 |" in text
    assert row_label(records[2]) == "SFM+CI"


def test_the_command_line_merges_runs(tmp_path, capsys):
    for name, backbone in (("a", "org/dino"), ("b", "org/clip")):
        (tmp_path / name).mkdir()
        rows = [record("sfm", "vanilla", 0.8, distill=backbone, eval_backbone=backbone),
                record("sfm", "vanilla", 0.6, distill=backbone, eval_backbone="org/other")]
        (tmp_path / name / "results.json").write_text(json.dumps(rows))
    assert len(load_records([tmp_path / "a", tmp_path / "b" / "results.json"])) == 4
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "merged.md")]) == 0
    printed = capsys.readouterr().out
    assert "| Train set | dino | clip | Average |" in printed
    assert printed.count("Table 4 style") == 2
    assert "Table 2 style" in (tmp_path / "merged.md").read_text()


def test_plots_are_written(tmp_path):
    records = [record("sfm", "vanilla", 0.5, curve=[0.1, 0.4, 0.5]), record("sfm", "ci", 0.7, curve=[0.1, 0.6, 0.7]),
               record("full_dataset", "golden", 0.75)]
    assert plot_accuracy_curves(records, tmp_path / "curves.png").stat().st_size > 10_000
    assert plot_accuracy_curves([record("random", "vanilla", 0.3)], tmp_path / "none.png") is None
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(25, 8, generator=generator)
    features = means.repeat_interleave(2, dim=0) + 0.1 * torch.randn(50, 8, generator=generator)
    labels = torch.arange(25).repeat_interleave(2)
    path = plot_flow_pca(means, torch.full((25,), 10), {"sfm": (features, labels), "lgm": (features.flip(1), labels)},
                         [f"class {c}" for c in range(25)], tmp_path / "flows.png")
    assert path.stat().st_size > 10_000
