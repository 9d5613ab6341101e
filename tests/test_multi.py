"""One synthetic set for several distillation backbones (``backbone: [A, B]``)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from sfm_hf.distill import loop, losses
from sfm_hf.backbones import load_backbone
from sfm_hf.config import ConfigError, config_from_dict
from sfm_hf.names import backbone_slug
from sfm_hf.pyramid import build_images
from sfm_hf.runner import run_stages
from sfm_hf.statistics import Statistics


def test_backbone_may_be_a_string_or_a_list(tmp_path):
    single = config_from_dict({"dataset": "d", "backbone": "org/a"})
    single.validate()
    assert single.backbone == "org/a" and single.backbones == ["org/a"] and single.evaluation_backbones == ["org/a"]
    joint = config_from_dict({"dataset": "d", "backbone": ["org/a", "org/b"], "hub": {"folders": ["dataset"]}})
    joint.validate()
    assert joint.backbones == ["org/a", "org/b"] and joint.evaluation_backbones == ["org/a", "org/b"]
    member = joint.member("org/b")
    assert member.backbone == "org/b" and member.eval_backbones == ["org/b"]
    assert Path(member.output_dir) == Path(joint.output_dir) / "backbones" / "org--b"
    one = config_from_dict({"dataset": "d", "backbone": ["org/a"]})
    one.validate()
    assert one.backbone == "org/a"
    for values, message in (
        ({"backbone": ["org/a", "org/a"]}, "empty or repeated"),
        ({"backbone": ["org/a", "org/b"], "statistics_from": "x", "stages": ["distill"]}, "statistics_from"),
        ({"backbone": ["org/a", "org/b"], "stages": ["export"]}, "exports only its dataset"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"dataset": "d", **values}).validate()


class GradientRecorder:
    """Stands in for Adam: keeps the gradient of each step instead of applying it."""

    def __init__(self, parameters):
        self.parameters = list(parameters)
        self.gradients = None

    def step(self):
        self.gradients = [parameter.grad.clone() for parameter in self.parameters]

    def zero_grad(self, set_to_none=True):
        for parameter in self.parameters:
            parameter.grad = None


def test_joint_step_is_the_mean_of_the_single_backbone_steps(demo_backbone, tiny_backbone, digits_dir, tmp_path):
    contexts = []
    for seed, name in enumerate((demo_backbone, tiny_backbone("dinov2"))):
        backbone = load_backbone(name)
        generator = torch.Generator().manual_seed(seed)
        statistics = Statistics(torch.randn(10, backbone.feature_dim, generator=generator),
                                torch.full((10,), 5), [str(c) for c in range(10)])
        config = tiny_config(digits_dir, name, tmp_path, representation="pixel")
        contexts.append(losses.build_context(config, backbone, statistics, rank=0, world_size=1,
                                              device=torch.device("cpu")))
    images = build_images("pixel", 10, 16, seed=0, decorrelate=False)
    recorder = GradientRecorder(images.parameters())
    single_losses, single_gradients = [], []
    for context in contexts:
        single_losses.append(float(loop.train_step(context, images, recorder, step=3)))
        single_gradients.append(recorder.gradients)
    joint_loss = float(loop.joint_train_step(contexts, images, recorder, step=3))
    assert joint_loss == pytest.approx(sum(single_losses) / 2, rel=1e-6)
    assert single_losses[0] != pytest.approx(single_losses[1])
    for joint, first, second in zip(recorder.gradients, *single_gradients):
        torch.testing.assert_close(joint, (first + second) / 2, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(first, second)


def test_joint_run_writes_per_backbone_statistics_one_set_and_its_evaluation(
    digits_dir, demo_backbone, tiny_backbone, tmp_path, accelerator
):
    other = tiny_backbone("dinov2")
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "joint", iterations=20)
    config.backbone = [demo_backbone, other]
    config.data.max_samples_per_split = 300
    config.stages = ["statistics", "distill", "evaluate", "export"]
    config.evaluate.trials = 1
    config.evaluate.iterations = config.evaluate.max_iterations = 5
    config.evaluate.train_sets = ["centroids", "sfm"]
    config.evaluate.full_dataset = False
    config.hub.folders = ["dataset"]
    config.validate()
    run_stages(config, accelerator)
    output = Path(config.output_dir)
    assert not (output / "statistics").exists()
    for name, dim in ((demo_backbone, 64), (other, 32)):
        member = output / "backbones" / backbone_slug(name)
        statistics = Statistics.load(member / "statistics")
        assert statistics.feature_dim == dim and statistics.metadata["images_seen"] == 300
        assert (member / "statistics" / "golden_classifier.safetensors").is_file()
        assert (member / "evaluation" / "projectors" / f"{backbone_slug(name)}.safetensors").is_file()
    synthetic = json.loads((output / "synthetic" / "synthetic.json").read_text())
    assert synthetic["backbone"] == [demo_backbone, other]
    assert set(synthetic["flow_cosine_by_backbone"]) == {demo_backbone, other}
    for cosines in synthetic["flow_cosine_by_backbone"].values():
        assert {"final_images", "initial_images", "random_real_images"} == set(cosines)
    records = json.loads((output / "results.json").read_text())
    keys = {(r["train_set"], r["distill_backbone"], r["eval_backbone"], r["mode"]) for r in records}
    for name in (demo_backbone, other):
        assert {("sfm", name, name, "vanilla"), ("sfm", name, name, "ci"), ("centroids", name, name, "vanilla"),
                ("full_dataset", name, name, "golden")} <= keys
    assert all(r["joint_backbones"] == [demo_backbone, other] for r in records)
    assert (output / "synthetic" / "data" / "multi" / "train-00000-of-00001.parquet").is_file()
