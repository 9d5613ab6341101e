"""Accelerate multi-node, shown: two "machines" on localhost (one CPU rank each, meeting at 127.0.0.1) give
the one-process run's statistics, synthetic images and Stage III results."""

import json

import pytest

from conftest import launch_config
from launching import assert_same_stage_outputs, launch_machines


def records_by_key(output):
    records = json.loads((output / "results.json").read_text())
    return {(r["train_set"], r["eval_backbone"], r["mode"]): r for r in records}


@pytest.mark.slow
def test_two_machines_equal_one_process(one_process_run, digits_dir, demo_backbone, tmp_path):
    output = tmp_path / "two-machines"
    recipe = tmp_path / "recipe.yaml"
    launch_config(digits_dir, demo_backbone, output).save(recipe)
    logs = launch_machines(recipe, tmp_path / "logs", num_machines=2)

    assert_same_stage_outputs(one_process_run, output, world_size=2)
    # Each machine streamed its own share of both splits and cached it under its rank.
    for prefix in ("train", "eval"):
        shards = sorted(path.name for path in (output / "statistics" / "features").glob(f"{prefix}-rank*"))
        assert shards == [f"{prefix}-rank00-00000.safetensors", f"{prefix}-rank01-00000.safetensors"]
    # The summary comes from the main process only (machine 1 shows just its local progress bars).
    assert "on 2 process(es)" in logs[0] and "Golden classifier accuracy" not in logs[1]

    one, two = records_by_key(one_process_run), records_by_key(output)
    assert one.keys() == two.keys()
    for key, record in one.items():
        assert (two[key]["trials"], two[key]["images"], two[key]["ipc"]) == (record["trials"], record["images"],
                                                                             record["ipc"]), key
        # Same seeds, same views; eval features may differ in the last bits with the batch split.
        assert two[key]["per_trial"] == pytest.approx(record["per_trial"], abs=2 / 450), key
