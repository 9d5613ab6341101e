"""One real 2-process CPU job (Stage I + Stage II) against the same recipe run in one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.runner import run_stages

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(digits_dir, demo_backbone, tmp_path, accelerator):
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "one", iterations=30, checkpoint_every=0)
    config.stages = ["statistics", "distill"]
    run_stages(config, accelerator)

    recipe = tmp_path / "recipe.yaml"
    config.output_dir = str(tmp_path / "two")
    config.save(recipe)
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "recipes" / "distill.py"), "--config", str(recipe),
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    one, two = tmp_path / "one", tmp_path / "two"
    metadata = json.loads((two / "statistics" / "statistics.json").read_text())
    assert metadata["world_size"] == 2
    assert metadata["images_seen"] == 1347
    stats_one = load_file(one / "statistics" / "statistics.safetensors")
    stats_two = load_file(two / "statistics" / "statistics.safetensors")
    assert torch.equal(stats_one["class_counts"], stats_two["class_counts"])
    torch.testing.assert_close(stats_two["class_means"], stats_one["class_means"], rtol=1e-6, atol=1e-6)

    # The converged fit is the same optimisation on the same rows (fp16 features that agree to rounding): same L2
    # choice, same predictions up to an image or two; L-BFGS's stopping point amplifies rounding in the weights.
    fit_one = json.loads((one / "statistics" / "golden_classifier.json").read_text())
    fit_two = json.loads((two / "statistics" / "golden_classifier.json").read_text())
    assert fit_one["l2"] == fit_two["l2"]
    assert fit_two["eval_accuracy"] == pytest.approx(fit_one["eval_accuracy"], abs=2 / 450)

    images_one = load_file(one / "synthetic" / "images.safetensors")
    images_two = load_file(two / "synthetic" / "images.safetensors")
    assert torch.equal(images_one["labels"], images_two["labels"])
    torch.testing.assert_close(images_two["images"], images_one["images"], rtol=0, atol=1e-4)
