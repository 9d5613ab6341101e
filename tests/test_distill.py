import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from sfm_hf.distill import loop, losses
from sfm_hf.errors import StageInputError, UserError
from sfm_hf.runner import run_stages
from sfm_hf.utils import library_versions


def distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, name="run", **options):
    output = tmp_path / name
    if not output.exists():
        shutil.copytree(statistics_run, output)
    ipc = options.pop("ipc", 1)
    config = tiny_config(digits_dir, demo_backbone, output, **options)
    config.ipc = ipc
    config.stages = ["distill"]
    run_stages(config, accelerator)
    return output


def synthetic(output):
    tensors = load_file(output / "synthetic" / "images.safetensors")
    return tensors["images"], tensors["labels"], json.loads((output / "synthetic" / "synthetic.json").read_text())


def test_sfm_makes_images_carry_the_statistical_flow(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator):
    output = distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=400,
                         pyramid_every=40, lr=0.02)
    images, labels, metadata = synthetic(output)
    assert images.shape == (10, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert labels.tolist() == list(range(10))
    cosines = metadata["flow_cosine"]
    print("cos(F*, flow):", cosines)
    assert cosines["final_images"] > cosines["initial_images"] + 0.5
    assert cosines["final_images"] > cosines["random_real_images"]
    assert (output / "synthetic" / "preview.png").stat().st_size > 1000


def test_ipc_two(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator):
    output = distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, ipc=2, iterations=20)
    images, labels, metadata = synthetic(output)
    assert images.shape == (20, 3, 16, 16)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert metadata["ipc"] == 2
    assert not torch.equal(images[0], images[1])
    assert metadata["versions"] == library_versions() and metadata["versions"]["transformers"]


@pytest.mark.parametrize("method, w_mode", [("lgm", "random"), ("lgm", "fixed"), ("lgm", "analytic"),
                                            ("tcdd", "random"), ("ncdd", "random")])
def test_other_objectives_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, method, w_mode):
    output = distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=6,
                         method=method, lgm_w_mode=w_mode, aug_rounds=2, log_every=3)
    images, _, metadata = synthetic(output)
    assert metadata["method"] == method and metadata["final_loss"] is not None
    assert torch.isfinite(images).all()


def test_interrupted_run_resumes_to_the_same_images(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator,
                                                   monkeypatch):
    options = dict(iterations=30, checkpoint_every=10)
    reference, _, _ = synthetic(distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator,
                                            name="straight", **options))
    original = loop.compute_loss

    def interrupted(context, images, step):
        if step == 25:
            raise KeyboardInterrupt
        return original(context, images, step)

    monkeypatch.setattr(loop, "compute_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, name="resumed", **options)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "rank00.pt", weights_only=True)["step"] == 20
    monkeypatch.setattr(loop, "compute_loss", original)
    resumed, _, _ = synthetic(distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator,
                                          name="resumed", **options))
    torch.testing.assert_close(resumed, reference, rtol=0, atol=1e-6)


def test_changed_settings_refuse_an_old_checkpoint(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator):
    distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=10, checkpoint_every=5)
    with pytest.raises(UserError, match="different settings.*lr"):
        distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=10,
                    checkpoint_every=5, lr=0.1)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(statistics_run, digits_dir, demo_backbone, tmp_path,
                                                              accelerator, monkeypatch):
    original = loop.compute_loss

    def poisoned(context, images, step):
        loss = original(context, images, step)
        return loss * float("nan") if step >= 15 else loss

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="non-finite at step 15"):
        distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=40,
                    checkpoint_every=10, log_every=5)
    state = torch.load(tmp_path / "run" / "checkpoints" / "rank00.pt", weights_only=True)
    assert state["step"] == 10
    assert all(torch.isfinite(level).all() for level in state["levels"])
    assert not (tmp_path / "run" / "synthetic").exists()


def test_distill_without_statistics_says_what_to_run(digits_dir, demo_backbone, tmp_path, accelerator):
    config = tiny_config(digits_dir, demo_backbone, tmp_path / "empty")
    config.stages = ["distill"]
    with pytest.raises(StageInputError, match="run the 'statistics' stage first"):
        run_stages(config, accelerator)


def test_class_shares_cover_every_class_once():
    for classes, world in [(10, 2), (10, 3), (7, 7)]:
        shares = [losses.class_share(classes, 2, rank, world) for rank in range(world)]
        assert [c for share in shares for c in share.classes] == list(range(classes))
        assert sum(share.num_images for share in shares) == 2 * classes
    with pytest.raises(UserError, match="at most one process per class"):
        losses.class_share(3, 1, 0, 4)


def test_loss_reaches_the_accelerate_trackers(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator,
                                              monkeypatch):
    logged = []
    monkeypatch.setattr(accelerator, "log", lambda values, step=None: logged.append((step, values)))
    distill_run(statistics_run, digits_dir, demo_backbone, tmp_path, accelerator, iterations=20, log_every=10)
    losses = [(step, values) for step, values in logged if "distill/loss" in values]
    assert [step for step, _ in losses] == [10, 20]
    assert all(set(values) == {"distill/loss"} for _, values in losses)
    # The end of the stage reports its summary once, at the last step.
    (final,) = [(step, values) for step, values in logged if "distill/final_loss" in values]
    assert final[0] == 20 and final[1]["distill/final_loss"] == losses[-1][1]["distill/loss"]
