"""benchmarks/figures.py on a tiny real run: the docs' pictures from a run folder and from make bench-real's layout."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_config
from sfm_hf.runner import run_stages

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = load("figures")
real_bench = load("real_bench")


@pytest.fixture(scope="module")
def scored_run(statistics_run, digits_dir, demo_backbone, tmp_path_factory):
    """Stage II from the centroids with snapshots, then a short Stage III that scores them (time to quality)."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("figures") / "run"
    shutil.copytree(statistics_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=20, lr=0.02, init="centroids",
                         snapshot_every=10)
    config.stages = ["distill", "evaluate"]
    config.evaluate.train_sets = ["centroids", "sfm"]
    config.evaluate.modes = ["vanilla", "ci"]
    config.evaluate.trials = 1
    config.evaluate.iterations = config.evaluate.max_iterations = 5
    # A few views and no full-dataset probe: the pictures need rows, not converged ones.
    config.evaluate.view_bank = 4
    config.evaluate.validation_images = 50
    config.evaluate.full_dataset = False
    config.evaluate.curve_points = 0
    config.evaluate.time_to_quality = True
    run_stages(config, Accelerator(cpu=True))
    return output


def check_pictures(paths: list[Path], names: list[str]) -> None:
    assert sorted(path.name for path in paths) == sorted(names)
    for path in paths:
        with Image.open(path) as picture:
            width, height = picture.size
        assert picture.format == "PNG" and 300 < width < 1500 and 100 < height < 1500, (path.name, width, height)
        assert path.stat().st_size < 200_000  # small enough to commit


def test_a_run_folder_gives_the_pipeline_images_bars_and_curve(scored_run, tmp_path):
    written = figures.demo_figures(scored_run, tmp_path)
    check_pictures(written, ["pipeline.png", "demo-synthetic.png", "demo-accuracy.png", "demo-time-to-quality.png"])


def test_a_run_without_snapshots_or_curves_still_gives_its_pictures(scored_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored_run, run)
    shutil.rmtree(run / "synthetic" / "snapshots")
    (run / "evaluation" / "time_to_quality.json").unlink()
    written = figures.demo_figures(run, tmp_path / "out")
    check_pictures(written, ["pipeline.png", "demo-synthetic.png", "demo-accuracy.png"])


def test_bench_real_layout_gives_a_picture_per_cell_and_the_table_as_bars(scored_run, tmp_path):
    """The folders and summary.json real_bench writes (one network, ipc 1, two starts), made from the tiny run."""
    runs, network = tmp_path / "real", "tiny"
    curve = json.loads((scored_run / "evaluation" / "time_to_quality.json").read_text())["curves"][0]
    selection = {}
    for start in ("centroids", "noise"):
        shutil.copytree(scored_run, runs / network / f"ipc1-{start}")
        selection[start] = {"method": "sfm", "init": start, "validation_mean": curve["points"][-1]["mean"],
                            "time_to_quality": dict(curve, init=start)}
    for seed in (0, 1):
        shutil.copytree(scored_run, runs / network / f"ipc1-seed{seed}")
    records = json.loads((scored_run / "results.json").read_text())
    flat = [record for record in records if record["train_set"] == "centroids"]
    summary = {network: {"ipc1": {"selection": selection, "chosen_init": "centroids",
                                  "time_to_quality": real_bench.time_to_quality(selection, "centroids", flat),
                                  "final": {str(seed): str(runs / network / f"ipc1-seed{seed}") for seed in (0, 1)}}}}
    (runs / "summary.json").write_text(json.dumps(summary))
    written = figures.real_figures(runs, tmp_path / "out")
    check_pictures(written, ["real-synthetic-tiny-ipc1.png", "real-time-to-quality-tiny-ipc1.png", "real-accuracy.png"])
    # Another bench's pictures go beside these under its own prefix.
    written = figures.real_figures(runs, tmp_path / "out", prefix="real-dinov2")
    check_pictures(written, ["real-dinov2-synthetic-tiny-ipc1.png", "real-dinov2-time-to-quality-tiny-ipc1.png",
                             "real-dinov2-accuracy.png"])


def test_the_final_runs_of_every_seed_are_pooled_into_one_bar():
    records = [{"train_set": "sfm", "mode": "vanilla", "eval_backbone": "a", "distill_backbone": "a",
                "per_trial": trials, "mean": sum(trials) / 2, "std": 0.0} for trials in ([0.5, 0.7], [0.6, 0.6])]
    (pooled,) = figures.pooled_over_seeds(records)
    assert pooled["per_trial"] == [0.5, 0.7, 0.6, 0.6] and pooled["mean"] == pytest.approx(0.6)
    assert pooled["std"] == pytest.approx((0.02 / 4) ** 0.5)


def test_the_command_line_needs_a_run(capsys):
    with pytest.raises(SystemExit):
        figures.main([])
    assert "--demo RUN, --real RUNS" in capsys.readouterr().err
