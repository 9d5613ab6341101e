"""distill.snapshot_every and evaluate.time_to_quality on the digits: the snapshots, their clock, the curve."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.config import ConfigError, DistillOptions
from sfm_hf.evaluation.time_to_quality import best_point, first_reaching
from sfm_hf.export.publish import SYNTHETIC_LOCAL_ONLY, _matches
from sfm_hf.runner import run_stages
from sfm_hf.snapshots import keep_snapshots_until, read_snapshots, write_snapshot


@pytest.fixture(scope="module")
def snapshot_run(statistics_run, digits_dir, demo_backbone, tmp_path_factory):
    """A short SFM run from centroids with a snapshot every 10 of its 25 steps."""
    from accelerate import Accelerator

    output = tmp_path_factory.mktemp("ttq") / "run"
    shutil.copytree(statistics_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=25, lr=0.02, init="centroids",
                         snapshot_every=10)
    config.stages = ["distill"]
    run_stages(config, Accelerator(cpu=True))
    return output


def test_snapshots_cover_the_start_every_n_steps_and_the_end_on_the_runs_clock(snapshot_run):
    snapshots = read_snapshots(snapshot_run / "synthetic")
    assert [snapshot.step for snapshot in snapshots] == [0, 10, 20, 25]
    seconds = [snapshot.seconds for snapshot in snapshots]
    assert seconds[0] < 0.5 and seconds == sorted(seconds)
    metadata = json.loads((snapshot_run / "synthetic" / "synthetic.json").read_text())
    assert seconds[-1] == metadata["seconds"]
    final = load_file(snapshot_run / "synthetic" / "images.safetensors")
    images, labels = snapshots[-1].load()
    assert torch.equal(images, final["images"]) and torch.equal(labels, final["labels"])
    start, _ = snapshots[0].load()
    assert not torch.equal(start, images)  # the optimiser moved them in between


def test_snapshot_writing_is_left_out_of_the_distillation_clock(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                                 accelerator, monkeypatch):
    import time

    import sfm_hf.distill.loop as loop

    slow_write = loop.write_snapshot

    def write(*args, **kwargs):
        time.sleep(0.3)
        slow_write(*args, **kwargs)

    monkeypatch.setattr(loop, "write_snapshot", write)
    output = tmp_path / "slow"
    shutil.copytree(statistics_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=6, snapshot_every=1)
    config.stages = ["distill"]
    started = time.perf_counter()
    run_stages(config, accelerator)
    wall = time.perf_counter() - started
    snapshots = read_snapshots(output / "synthetic")
    assert len(snapshots) == 7 and wall > 7 * 0.3
    # Six snapshots inside the loop slept 1.8 s; none of it is on the clock.
    assert snapshots[-1].seconds < wall - 6 * 0.3


def test_a_resumed_run_drops_only_the_snapshots_it_makes_again(tmp_path):
    images, labels = torch.rand(2, 3, 4, 4), torch.arange(2)
    for step in (0, 10, 20):
        write_snapshot(tmp_path, step, float(step), images, labels)
    keep_snapshots_until(tmp_path, 10)
    assert [snapshot.step for snapshot in read_snapshots(tmp_path)] == [0, 10]
    assert sorted(path.name for path in (tmp_path / "snapshots").iterdir()) == [
        "index.json", "step-00000.safetensors", "step-00010.safetensors"]
    keep_snapshots_until(tmp_path, 0)
    assert read_snapshots(tmp_path) == []


def test_snapshots_are_never_uploaded():
    assert _matches("snapshots/step-00010.safetensors", SYNTHETIC_LOCAL_ONLY)
    assert _matches("snapshots/index.json", SYNTHETIC_LOCAL_ONLY)
    assert not _matches("data/default/images.safetensors", SYNTHETIC_LOCAL_ONLY)


@pytest.mark.parametrize("key, value", [("snapshot_every", -1), ("init_noise", 1.5), ("init_noise", -0.1)])
def test_bad_snapshot_and_blend_options_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"distill.{key}"):
        DistillOptions(**{key: value}).validate()


def test_the_curves_last_point_is_the_final_tables_row(snapshot_run, digits_dir, demo_backbone, tmp_path, accelerator):
    output = tmp_path / "evaluated"
    shutil.copytree(snapshot_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=25, lr=0.02, init="centroids",
                         snapshot_every=10)
    config.stages = ["evaluate"]
    config.evaluate.train_sets = ["centroids", "sfm"]
    config.evaluate.modes = ["vanilla", "ci"]
    config.evaluate.trials = 2
    config.evaluate.iterations = config.evaluate.max_iterations = 40
    config.evaluate.view_bank = 8
    config.evaluate.full_dataset = False
    config.evaluate.time_to_quality = True
    run_stages(config, accelerator)
    records = {(r["train_set"], r["mode"]): r for r in json.loads((output / "results.json").read_text())}
    result = json.loads((output / "evaluation" / "time_to_quality.json").read_text())
    assert {curve["mode"] for curve in result["curves"]} == {"vanilla", "ci"}
    for curve in result["curves"]:
        assert [point["step"] for point in curve["points"]] == [0, 10, 20, 25]
        assert curve["init"] == "centroids" and len(curve["points"][-1]["per_trial"]) == 2
        last = curve["points"][-1]
        assert last["mean"] == records[("sfm", curve["mode"])]["mean"] == curve["final_row_mean"]
        assert last["per_trial"] == records[("sfm", curve["mode"])]["per_trial"]
    assert {(flat["train_set"], flat["mode"]) for flat in result["flat"]} >= {("centroids", "vanilla")}
    for suffix in ("md", "png"):
        assert (output / "evaluation" / f"time_to_quality.{suffix}").stat().st_size > 0


def test_reaching_a_level_is_the_first_point_at_or_above_it():
    curve = {"points": [{"seconds": 0.0, "mean": 0.3}, {"seconds": 5.0, "mean": 0.6}, {"seconds": 9.0, "mean": 0.6},
                        {"seconds": 12.0, "mean": 0.5}]}
    assert first_reaching(curve, 0.55)["seconds"] == 5.0
    assert first_reaching(curve, 0.3)["seconds"] == 0.0
    assert first_reaching(curve, 0.7) is None
    assert best_point(curve)["seconds"] == 5.0


def test_a_run_without_snapshots_drops_the_stale_ones_of_other_images(snapshot_run, digits_dir, demo_backbone,
                                                                       tmp_path, accelerator):
    output = tmp_path / "rerun"
    shutil.copytree(snapshot_run, output)
    config = tiny_config(digits_dir, demo_backbone, output, iterations=5, init="centroids")
    config.stages = ["distill"]
    run_stages(config, accelerator)
    assert read_snapshots(output / "synthetic") == []
