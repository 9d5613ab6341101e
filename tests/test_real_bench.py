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
