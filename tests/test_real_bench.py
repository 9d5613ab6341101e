"""benchmarks/real_bench.py: how its summary assembles Table 4 from the final and cross runs."""

import importlib.util
from pathlib import Path

from sfm_hf.report import paper_tables

# real_bench puts benchmarks/ on sys.path itself, for its own imports (real_data, harness).
spec = importlib.util.spec_from_file_location("real_bench", Path(__file__).parents[1] / "benchmarks" / "real_bench.py")
real_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_bench)

MBV2, EFFNET = "outputs/real-assets/mobilenet_v2-32px", "/abs/outputs/real-assets/efficientnet_lite0-32px"


def record(train_set: str, mode: str, distill: str, evaluate: str, mean: float) -> dict:
    return {"train_set": train_set, "mode": mode, "distill_backbone": distill, "eval_backbone": evaluate,
            "mean": mean, "std": 0.0, "trials": 5}


def test_a_cross_run_without_its_full_dataset_probe_reads_that_cell_from_the_other_networks_own_run():
    records = [
        record("sfm", "vanilla", MBV2, MBV2, 0.55), record("full_dataset", "vanilla", MBV2, MBV2, 0.86),
        record("sfm", "vanilla", EFFNET, EFFNET, 0.56), record("full_dataset", "vanilla", EFFNET, EFFNET, 0.77),
        # MobileNetV2's images on EfficientNet-Lite0 (named by another path to the same folder), no full-dataset row.
        record("sfm", "vanilla", MBV2, "outputs/real-assets/efficientnet_lite0-32px", 0.41),
    ]
    filled = real_bench.with_borrowed_full_dataset(records)
    borrowed = filled[len(records):]
    assert borrowed == [record("full_dataset", "vanilla", MBV2, "outputs/real-assets/efficientnet_lite0-32px", 0.77)]
    table = paper_tables(filled).split("Table 4 style: distilled with mobilenet_v2-32px")[1]
    assert "| Full dataset | 86.0 ± 0.0 | 77.0 ± 0.0 | 81.5 |" in table


def test_a_cell_the_runs_measured_is_never_replaced():
    records = [record("full_dataset", "vanilla", EFFNET, EFFNET, 0.77),
               record("sfm", "vanilla", MBV2, EFFNET, 0.41), record("full_dataset", "vanilla", MBV2, EFFNET, 0.70)]
    assert real_bench.with_borrowed_full_dataset(records) == records


def curve(key: str, init: str, points: list[tuple[float, float]], method: str = "sfm") -> dict:
    """A run as score_on_validation reports it: its final score, cost and time-to-quality curve."""
    return {"method": method, "init": init, "validation_mean": points[-1][1], "time_to_quality": {
        "train_set": method, "init": init, "eval_backbone": MBV2, "mode": "vanilla", "final_row_mean": points[-1][1],
        "points": [{"step": 10 * k, "seconds": seconds, "mean": mean} for k, (seconds, mean) in enumerate(points)]}}


def test_the_time_to_quality_table_reads_each_runs_curve_against_centroids_and_the_best_final_accuracy():
    selection = {
        "centroids": curve("centroids", "centroids", [(0.0, 0.55), (10.0, 0.58), (20.0, 0.57)]),
        "noise": curve("noise", "noise", [(0.0, 0.10), (12.0, 0.30), (24.0, 0.55)]),
        "lgm-noise": curve("lgm-noise", "noise", [(0.0, 0.10), (50.0, 0.17), (200.0, 0.11)], method="lgm"),
    }
    flat = [{"train_set": "centroids", "mode": "vanilla", "eval_backbone": MBV2, "mean": 0.56, "std": 0.0},
            {"train_set": "random", "mode": "vanilla", "eval_backbone": MBV2, "mean": 0.30, "std": 0.0}]
    cell = real_bench.time_to_quality(selection, "centroids", flat)
    rows = {row["run"]: row for row in cell["rows"]}
    assert cell["centroids"] == 0.56 and cell["best_final"] == 0.57
    # 95 % of the best final accuracy (0.5415): centroids at once, noise at its last point, LGM never.
    assert rows["centroids"]["to_centroids_s"] == 10.0 and rows["centroids"]["to_95_s"] == 0.0
    assert rows["noise"]["to_centroids_s"] is None and rows["noise"]["to_95_s"] == 24.0
    assert rows["lgm-noise"]["to_centroids_s"] is None and rows["lgm-noise"]["to_95_s"] is None
    assert (rows["lgm-noise"]["best"], rows["lgm-noise"]["best_s"], rows["lgm-noise"]["final"]) == (0.17, 50.0, 0.11)
    assert cell["headline"] == ("SFM (from centroids) reaches 58.0 % in 10 s; LGM (from noise) reaches 17.0 % in "
                                "50 s (final 11.0 % at 200 s, 20 steps)")
    table = real_bench.time_to_quality_table({"mobilenet_v2": {"ipc1": {"time_to_quality": cell}}})
    assert "| SFM from centroids (chosen) | 20 | 10 | 0 | 58.0 (step 10, 10 s) | 57.0 (20 s) |" in table
    assert "| LGM from noise | 20 | – | – | 17.0 (step 10, 50 s) | 11.0 (200 s) |" in table


class FakeLauncher:
    """Writes what a scored run leaves (results.json, synthetic.json, its curve) and records each argv."""

    def __init__(self):
        self.argvs = []

    def __call__(self, argv):
        import json

        self.argvs.append(argv)
        value = lambda key: argv[len(argv) - 1 - argv[::-1].index(key) + 1]  # noqa: E731  the last one counts
        run, method = Path(value("--output_dir")), value("--evaluate.train_sets")
        (run / "synthetic").mkdir(parents=True, exist_ok=True)
        (run / "evaluation").mkdir(exist_ok=True)
        (run / "results.json").write_text(json.dumps([record(method, "vanilla", MBV2, MBV2, 0.5)]))
        (run / "synthetic" / "synthetic.json").write_text(json.dumps({
            "method": method, "ipc": 1, "iterations": int(value("--distill.iterations")), "seconds": 3.0,
            "distill": {"init": value("--distill.init"), "aug_rounds": 1},
            "flow_cosine": {"initial_images": 0.1, "final_images": 0.9}}))
        (run / "evaluation" / "time_to_quality.json").write_text(json.dumps({"curves": [{"points": []}]}))
        return {"seconds": 1.0, "memory": None}


def test_a_scored_run_snapshots_its_steps_and_scores_them_on_validation(tmp_path):
    (tmp_path / "base" / "statistics").mkdir(parents=True)
    launch = FakeLauncher()
    argv = ["--config", "r.yaml", "--distill.iterations", "100", "--distill.init", "noise",
            "--distill.iterations", "300"]
    scored = real_bench.score_on_validation(launch, tmp_path / "base", tmp_path / "lgm", argv, 2, method="lgm",
                                            snapshots=10)
    called = launch.argvs[0]
    # The last --distill.iterations is the run's: 300 steps, a snapshot every 30.
    assert called[called.index("--distill.snapshot_every") + 1] == "30"
    assert called[called.index("--evaluate.time_to_quality") + 1] == "true"
    assert called[called.index("--eval_split") + 1] == "validation"
    assert called[called.index("--distill.method") + 1] == called[called.index("--evaluate.train_sets") + 1] == "lgm"
    assert scored["validation_mean"] == 0.5 and scored["time_to_quality"] == {"points": []}
    assert scored["method"] == "lgm" and scored["s_per_step"] == 0.01
    # Scored once: a second call reads the folder.
    real_bench.score_on_validation(launch, tmp_path / "base", tmp_path / "lgm", argv, 2, method="lgm", snapshots=10)
    assert len(launch.argvs) == 1
    plain = real_bench.score_on_validation(FakeLauncher(), tmp_path / "base", tmp_path / "sfm", argv, 2)
    assert plain["method"] == "sfm"


def test_snapshot_spacing():
    assert real_bench.snapshot_every(300, 10) == 30
    assert real_bench.snapshot_every(5, 10) == 1
    assert real_bench.snapshot_every(300, 0) == 0
