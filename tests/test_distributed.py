"""One real 2-process CPU job (Stage I + Stage II) against the same recipe run in one process."""

import pytest

from conftest import launch_config
from launching import assert_same_stage_outputs, launch


@pytest.mark.slow
def test_two_processes_equal_one(one_process_run, digits_dir, demo_backbone, tmp_path):
    config = launch_config(digits_dir, demo_backbone, tmp_path / "two")
    config.stages = ["statistics", "distill"]
    recipe = tmp_path / "recipe.yaml"
    config.save(recipe)
    launch(recipe, num_processes=2)
    assert_same_stage_outputs(one_process_run, tmp_path / "two", world_size=2)
