"""Progress lines without a terminal, and what the experiment trackers receive from every stage."""

import logging
import re

from accelerate.tracking import GeneralTracker

from conftest import tiny_config
from sfm_hf.progress import LineProgress, progress
from sfm_hf.runner import run_stages


def test_without_a_terminal_a_line_every_ten_percent(accelerator, caplog):
    caplog.set_level(logging.INFO, logger="sfm_hf")
    bar = progress(range(40, 200), total=200, initial=40, desc="Stage II: sfm", unit="step", mode="auto")
    assert isinstance(bar, LineProgress)  # pytest captures stderr: no terminal
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = [record.getMessage() for record in caplog.records if record.name == "sfm_hf.progress"]
    assert [int(re.search(r"sfm: (\d+)% \(", line).group(1)) for line in lines] == list(range(30, 101, 10))
    assert "Stage II: sfm: 100% (200/200 step)" in lines[-1] and lines[-1].endswith("step/s, loss 0.0050")
    assert not any("\r" in line for line in lines)


def test_progress_off_and_other_processes_print_nothing(accelerator, caplog):
    caplog.set_level(logging.INFO, logger="sfm_hf")
    for bar in (progress(range(50), desc="a", unit="img", mode="off"),
                progress(range(50), desc="b", unit="img", mode="bar", enabled=False)):
        assert sum(1 for _ in bar) == 50
    unknown = progress(total=None, desc="streamed", unit="img", mode="lines")
    unknown.update(7)
    unknown.close()
    assert [record.getMessage().split(",")[0].split("] ")[-1] for record in caplog.records] == ["streamed: 7 img"]


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.values, self.images = None, {}, {}

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.values.update(values)

    def log_images(self, values, step=None, **kwargs):
        self.images.update(values)


def test_trackers_get_the_config_and_every_stages_numbers(digits_dir, tiny_backbone, tmp_path):
    from accelerate import Accelerator

    tracker = RecordingTracker()
    output = tmp_path / "run"
    backbone = tiny_backbone("vit")
    config = tiny_config(digits_dir, backbone, output, iterations=10)
    config.stages = ["statistics", "distill", "evaluate"]
    config.golden.epochs = 2
    config.evaluate.trials, config.evaluate.iterations, config.evaluate.curve_points = 1, 5, 0
    config.evaluate.train_sets, config.evaluate.modes, config.evaluate.full_dataset = ["random", "sfm"], ["vanilla"], False
    config.tracker_project = "digits-check"
    run_stages(config, Accelerator(cpu=True, log_with=[tracker]))
    assert tracker.config["evaluate.train_sets"] == "random,sfm" and tracker.config["distill.iterations"] == 10
    assert tracker.config["tracker_project"] == "digits-check"
    values = tracker.values
    assert values["statistics/images_per_second"] > 0 and 0 <= values["statistics/golden_accuracy"] <= 1
    assert "distill/loss" in values and -1 <= values["distill/flow_cosine/final_images"] <= 1
    name = backbone.rstrip("/").split("/")[-1]
    assert {f"evaluate/random/vanilla/{name}", f"evaluate/sfm/vanilla/{name}"} <= set(values)
    (preview,) = tracker.images["distill/preview"]
    assert preview.shape[2] == 3 and preview.ndim == 3
