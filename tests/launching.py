"""Real multi-process CPU jobs for the tests: ``accelerate launch recipes/distill.py``, loopback addresses only.

Shared by the 2-process (one machine), 2-machine and Stage III process-count tests, and the
comparison of a multi-process run with the one-process run of the same recipe.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
# gloo between CPU ranks (see recipes/distill.py); one thread per rank so that ranks do not fight over cores.
CPU_ENVIRONMENT = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def launch_command(recipe: Path, *, num_processes: int, port: int, num_machines: int = 1, machine_rank: int = 0) -> list:
    """``accelerate launch`` of the recipe; ``num_processes`` counts the ranks of all machines together."""
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines",
        str(num_machines), "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]
    if num_machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", LOOPBACK]
    return command + [str(REPO / "recipes" / "distill.py"), "--config", str(recipe)]


def launch(recipe: Path, *, num_processes: int = 2, timeout: float = 600) -> str:
    """One machine with ``num_processes`` CPU ranks; returns the job's output, fails the test with its tail."""
    finished = subprocess.run(
        launch_command(recipe, num_processes=num_processes, port=free_port()),
        env={**os.environ, **CPU_ENVIRONMENT}, capture_output=True, text=True, timeout=timeout,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return finished.stdout


def launch_machines(recipe: Path, logs: Path, *, num_machines: int = 2, timeout: float = 600) -> list[str]:
    """``num_machines`` "machines" on localhost, one CPU rank each, meeting at 127.0.0.1; returns each one's log.

    A machine that fails leaves the others waiting for it in a collective, so they are stopped then.
    """
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    paths = [logs / f"machine{rank}.log" for rank in range(num_machines)]
    machines = []
    for rank, path in enumerate(paths):
        with path.open("w") as log:
            command = launch_command(recipe, num_processes=num_machines, port=port, num_machines=num_machines,
                                     machine_rank=rank)
            machines.append(subprocess.Popen(command, env={**os.environ, **CPU_ENVIRONMENT}, stdout=log,
                                             stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(machine.poll() is None for machine in machines):
        failed = any(machine.returncode not in (None, 0) for machine in machines)
        if failed or time.monotonic() > deadline:
            for machine in machines:
                if machine.poll() is None:
                    machine.kill()
                    machine.wait()
            break
        time.sleep(0.5)
    outputs = [path.read_text() for path in paths]
    for rank, (machine, output) in enumerate(zip(machines, outputs)):
        assert machine.returncode == 0, f"machine {rank} exited with {machine.returncode}:\n{output[-4000:]}"
    return outputs


def assert_same_stage_outputs(one: Path, other: Path, *, world_size: int) -> None:
    """Stage I and II outputs of a ``world_size``-process run equal those of the one-process run ``one``."""
    metadata = json.loads((other / "statistics" / "statistics.json").read_text())
    assert metadata["world_size"] == world_size
    assert metadata["images_seen"] == json.loads((one / "statistics" / "statistics.json").read_text())["images_seen"]
    stats_one = load_file(one / "statistics" / "statistics.safetensors")
    stats_other = load_file(other / "statistics" / "statistics.safetensors")
    assert torch.equal(stats_one["class_counts"], stats_other["class_counts"])
    torch.testing.assert_close(stats_other["class_means"], stats_one["class_means"], rtol=1e-6, atol=1e-6)

    # The converged fit is the same optimisation on the same rows (fp16 features that agree to rounding): same L2
    # choice, same predictions up to an image or two; L-BFGS's stopping point amplifies rounding in the weights.
    fit_one = json.loads((one / "statistics" / "golden_classifier.json").read_text())
    fit_other = json.loads((other / "statistics" / "golden_classifier.json").read_text())
    assert fit_one.get("l2") == fit_other.get("l2")
    assert fit_other["eval_accuracy"] == pytest.approx(fit_one["eval_accuracy"], abs=2 / 450)

    images_one = load_file(one / "synthetic" / "images.safetensors")
    images_other = load_file(other / "synthetic" / "images.safetensors")
    assert torch.equal(images_one["labels"], images_other["labels"])
    torch.testing.assert_close(images_other["images"], images_one["images"], rtol=0, atol=1e-4)
