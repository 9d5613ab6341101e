"""The fast-path options change speed or memory, never the result beyond the precision they trade away."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sfm_hf.backbones import load_backbone
from sfm_hf.config import Config, ConfigError, parse_config
from sfm_hf.data import image_batches, open_split, resize_center_crop
from sfm_hf.distill.loop import make_optimizer, train_step
from sfm_hf.distill.losses import build_context
from sfm_hf.pyramid import build_images
from sfm_hf.statistics import Statistics

NUM_CLASSES = 10  # the digits' classes, so that LGM can stream its real batch from them
IPC = 2
CPU = torch.device("cpu")


def class_statistics(backbone) -> Statistics:
    """Class means of the backbone's features of ten noisy colour fields: a target flow images can approach."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(NUM_CLASSES, 3, 1, 1, generator=generator)
    images = (colours + 0.3 * torch.rand(NUM_CLASSES, 3, 28, 28, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        means = backbone(images)
    return Statistics(means, torch.full((NUM_CLASSES,), 10), [str(c) for c in range(NUM_CLASSES)],
                      {"non_target": "class_mean"})


def distill_steps(backbone_id: str, output_dir, steps: int, *, compile: bool = False, attention: str | None = None,
                  dataset: str = "", forward_calls: list | None = None, **distill_options):
    """``steps`` real training steps (build_context + train_step); returns (losses, final images)."""
    backbone = load_backbone(backbone_id, attn_implementation=attention)
    statistics = class_statistics(backbone)
    if forward_calls is not None:
        # The embeddings, not the whole model: a re-run stops early once the tensors backward needs exist.
        backbone.model.embeddings.register_forward_hook(lambda *_: forward_calls.append(1))
    if compile:
        backbone = torch.compile(backbone)
    config = Config(dataset=dataset, backbone=backbone_id, output_dir=str(output_dir), ipc=IPC, seed=0)
    config.distill.syn_res = 16
    config.distill.lr = 0.05
    for key, value in distill_options.items():
        setattr(config.distill, key, value)
    context = build_context(config, backbone, statistics, rank=0, world_size=1, device=CPU)
    images = build_images("pyramid", NUM_CLASSES * IPC, 16, seed=0)
    while images.can_grow():
        images.grow()
    optimizer = make_optimizer(images, config.distill.lr, CPU)
    losses = [float(train_step(context, images, optimizer, step)) for step in range(steps)]
    with torch.no_grad():
        return losses, images()


def test_bf16_follows_the_fp32_loss_trajectory(tiny_backbone, tmp_path):
    backbone = tiny_backbone("dinov2")
    fp32, fp32_images = distill_steps(backbone, tmp_path, 8)
    bf16, bf16_images = distill_steps(backbone, tmp_path, 8, mixed_precision="bf16")
    print("fp32", fp32, "\nbf16", bf16)
    assert fp32[-1] < fp32[0] - 0.05 and bf16[-1] < bf16[0] - 0.05
    assert np.abs(np.array(fp32) - np.array(bf16)).max() < 0.02
    assert (fp32_images - bf16_images).abs().mean() < 0.01
    assert fp32 != bf16, "bf16 autocast did not engage: the trajectories are bit-identical"


def test_compile_gives_the_same_images_as_eager(tiny_backbone, tmp_path):
    backbone = tiny_backbone("dinov2")
    eager, eager_images = distill_steps(backbone, tmp_path, 2)
    compiled, compiled_images = distill_steps(backbone, tmp_path, 2, compile=True)
    assert compiled == pytest.approx(eager, abs=1e-5)
    # Adam turns last-bit differences of near-zero gradients into visible steps on a few pixels only.
    assert (compiled_images - eager_images).abs().mean() < 1e-6
    torch.testing.assert_close(compiled_images, eager_images, atol=1e-3, rtol=0)


@pytest.mark.parametrize("method", ["sfm", "lgm"])
def test_checkpoint_chunks_recompute_without_changing_the_step(tiny_backbone, digits_dir, tmp_path, method):
    backbone = tiny_backbone("dinov2")
    plain_calls, chunked_calls = [], []
    options = dict(method=method, aug_rounds=2, dataset=str(digits_dir))
    plain, plain_images = distill_steps(backbone, tmp_path, 2, forward_calls=plain_calls, **options)
    chunked, chunked_images = distill_steps(backbone, tmp_path, 2, forward_calls=chunked_calls, checkpoint_chunk=7,
                                            **options)
    assert chunked == pytest.approx(plain, abs=1e-6)
    torch.testing.assert_close(chunked_images, plain_images, atol=1e-6, rtol=0)
    # Per step, SFM forwards 20 views per round (2 rounds), LGM all 40 at once plus its real batch (no graph,
    # so never chunked); each chunk of at most 7 views is forwarded once and re-run once in the backward pass.
    synthetic_batches, views_per_batch, real_forwards = (1, 40, 1) if method == "lgm" else (2, 20, 0)
    chunks = synthetic_batches * math.ceil(views_per_batch / 7)
    assert len(plain_calls) == 2 * (synthetic_batches + real_forwards)
    assert len(chunked_calls) == 2 * (2 * chunks + real_forwards)


@pytest.mark.parametrize("family", ["dinov2", "vit", "clip"])
def test_sdpa_is_the_default_attention_and_matches_eager(tiny_backbone, family):
    default = load_backbone(tiny_backbone(family))
    eager = load_backbone(tiny_backbone(family), attn_implementation="eager")
    assert default.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gradients = []
    for backbone in (default, eager):
        pixels = images.clone().requires_grad_(True)
        features = backbone(pixels)
        features.square().sum().backward()
        gradients.append((features.detach(), pixels.grad))
    torch.testing.assert_close(gradients[0][0], gradients[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gradients[0][1], gradients[1][1], atol=1e-5, rtol=1e-4)


def reference_resize_center_crop(image: Image.Image, size: int, crop_ratio: float) -> np.ndarray:
    """The obvious two-step version: resize the whole image, then crop its centre."""
    short = max(size, round(size / crop_ratio))
    width, height = image.size
    scale = short / min(width, height)
    new_size = (max(short, round(width * scale)), max(short, round(height * scale)))
    resized = image.resize(new_size, Image.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.array(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


@pytest.mark.parametrize("width, height, size, crop_ratio", [
    (500, 375, 224, 0.875), (375, 500, 224, 0.875), (333, 500, 28, 0.875), (64, 48, 32, 0.875),
    (100, 80, 224, 0.875), (300, 300, 224, 1.0),
])
def test_box_resize_matches_resize_then_crop(width, height, size, crop_ratio):
    rng = np.random.default_rng(0)
    smooth = Image.fromarray((rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8))
    image = Image.fromarray(np.clip(np.asarray(smooth.resize((width, height), Image.BICUBIC), np.int16)
                                    + rng.integers(-20, 20, (height, width, 3)), 0, 255).astype(np.uint8))
    fast = resize_center_crop(image, size, crop_ratio).astype(int)
    reference = reference_resize_center_crop(image, size, crop_ratio).astype(int)
    assert fast.shape == reference.shape == (size, size, 3)
    difference = np.abs(fast - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_checkpoint_chunk_must_not_be_negative():
    config = parse_config(["--dataset", "d", "--backbone", "b", "--distill.checkpoint_chunk", "16"], Config())
    assert config.distill.checkpoint_chunk == 16
    with pytest.raises(ConfigError, match="checkpoint_chunk"):
        parse_config(["--dataset", "d", "--backbone", "b", "--distill.checkpoint_chunk", "-1"], Config())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_loader_pins_batches_when_cuda_is_available(digits_dir):
    source = open_split(str(digits_dir), "test")
    batch = next(iter(image_batches(source, image_size=16, batch_size=8, num_workers=1)))
    assert batch.images.is_pinned() and batch.labels.is_pinned()
