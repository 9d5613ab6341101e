"""Tests for the counter-based differentiable augmentation in ``sfm_hf.augment``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfm_hf.augment import AugmentConfig, augment, center_resize, hash_normal, hash_uniform

DEFAULT = AugmentConfig()
# Flip every image and keep the whole frame, so the expected output is computable.
FLIP_ONLY = AugmentConfig(flip_p=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), noise_p=0.0)


def _images(n: int = 6, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device(dtype: torch.dtype) -> None:
    images = _images().to(dtype)
    out = augment(images, 16, DEFAULT, seed=0, step=0)
    assert out.shape == (6, 3, 16, 16)
    assert out.dtype == dtype
    assert out.device == images.device


def test_non_square_input() -> None:
    images = torch.rand(4, 3, 18, 30)
    assert augment(images, 12, DEFAULT, seed=0, step=0).shape == (4, 3, 12, 12)


def test_gradient_flows_to_input() -> None:
    images = _images().requires_grad_(True)
    augment(images, 16, DEFAULT, seed=1, step=2).square().sum().backward()
    assert images.grad is not None
    assert images.grad.abs().sum() > 0


def test_deterministic_per_seed_and_step() -> None:
    images = _images()
    first = augment(images, 16, DEFAULT, seed=3, step=10)
    assert torch.equal(first, augment(images, 16, DEFAULT, seed=3, step=10))
    assert not torch.equal(first, augment(images, 16, DEFAULT, seed=3, step=11))
    assert not torch.equal(first, augment(images, 16, DEFAULT, seed=4, step=10))


@pytest.mark.parametrize("split", [1, 5, 12])
def test_slicing_invariance(split: int) -> None:
    images = _images(n=17)
    whole = augment(images, 16, DEFAULT, seed=2, step=7)
    tail = augment(images[split:], 16, DEFAULT, seed=2, step=7, index_offset=split)
    head = augment(images[:split], 16, DEFAULT, seed=2, step=7)
    assert torch.equal(whole[split:], tail)
    assert torch.equal(whole[:split], head)


def test_flip_with_full_crop_matches_flipped_resize() -> None:
    images = _images(size=24)
    expected = torch.flip(
        F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False), dims=[-1]
    )
    out = augment(images, 16, FLIP_ONLY, seed=0, step=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_identity_config_matches_center_resize() -> None:
    identity = AugmentConfig(flip_p=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), noise_p=0.0)
    images = _images(size=24)
    out = augment(images, 32, identity, seed=0, step=0)
    torch.testing.assert_close(out, center_resize(images, 32), atol=1e-5, rtol=1e-5)


def test_center_resize_crops_the_centre_square() -> None:
    images = torch.rand(2, 3, 10, 16)
    assert torch.equal(center_resize(images, 10), images[..., :, 3:13])
    assert center_resize(images, 7).shape == (2, 3, 7, 7)


def test_flip_and_noise_frequencies() -> None:
    images = torch.full((2000, 3, 4, 4), 0.5)
    full_frame = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    out = augment(images, 4, AugmentConfig(noise_p=0.3, **full_frame), seed=0, step=0)
    noised = (out != 0.5).flatten(1).any(dim=1).float().mean().item()
    assert noised == pytest.approx(0.3, abs=0.04)

    ramp = torch.linspace(0, 1, 4).expand(2000, 3, 4, 4)
    flipped = augment(ramp, 4, AugmentConfig(noise_p=0.0, **full_frame), seed=0, step=0)
    flip_rate = (flipped[:, 0, 0, 0] > flipped[:, 0, 0, -1]).float().mean().item()
    assert flip_rate == pytest.approx(0.5, abs=0.04)


def test_noise_statistics() -> None:
    config = AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), noise_p=1.0, noise_std=0.2, noise_mean=0.5
    )
    noise = augment(torch.zeros(64, 3, 32, 32), 32, config, seed=0, step=0)
    assert noise.mean().item() == pytest.approx(0.5, abs=0.005)
    assert noise.std().item() == pytest.approx(0.2, abs=0.005)


def test_crops_are_sub_windows() -> None:
    """A crop only shows pixels of the source, so a constant-per-column ramp stays in range."""
    ramp = torch.linspace(0, 1, 32).expand(200, 3, 32, 32).contiguous()
    config = AugmentConfig(noise_p=0.0)
    out = augment(ramp, 16, config, seed=5, step=0)
    assert out.min() >= 0.0 and out.max() <= 1.0
    spans = out[:, 0, 0, :].amax(dim=1) - out[:, 0, 0, :].amin(dim=1)
    # Area fractions down to 0.08 give width fractions down to about 0.24.
    assert spans.min() > 0.2 and spans.max() <= 1.0
    assert spans.std() > 0.1


def test_hash_uniform_range_and_moments() -> None:
    uniforms = hash_uniform(0, 0, torch.arange(1000), stream=1, count=200)
    assert uniforms.shape == (1000, 200)
    assert uniforms.dtype == torch.float32
    assert uniforms.min() > 0.0 and uniforms.max() < 1.0
    assert uniforms.mean().item() == pytest.approx(0.5, abs=0.005)
    assert uniforms.var().item() == pytest.approx(1 / 12, abs=0.002)
    histogram = torch.histc(uniforms, bins=10, min=0.0, max=1.0) / uniforms.numel()
    torch.testing.assert_close(histogram, torch.full((10,), 0.1), atol=0.005, rtol=0)


def test_hash_uniform_is_a_pure_function_of_its_key() -> None:
    index = torch.arange(10, 30)
    full = hash_uniform(9, 3, index, stream=2, count=5)
    assert torch.equal(full[4:7], hash_uniform(9, 3, index[4:7], stream=2, count=5))
    assert torch.equal(full[[3, 0]], hash_uniform(9, 3, index[[3, 0]], stream=2, count=5))
    for other in (
        hash_uniform(8, 3, index, stream=2, count=5),
        hash_uniform(9, 4, index, stream=2, count=5),
        hash_uniform(9, 3, index, stream=3, count=5),
    ):
        assert not torch.isclose(full, other).any()


def test_hash_uniform_handles_large_and_negative_keys() -> None:
    index = torch.tensor([0, 2**40, -1])
    uniforms = hash_uniform(-5, 2**35, index, stream=1, count=3)
    assert uniforms.min() > 0.0 and uniforms.max() < 1.0
    assert len(set(uniforms.flatten().tolist())) == 9


def test_hash_uniform_chunking_does_not_change_values(monkeypatch: pytest.MonkeyPatch) -> None:
    index = torch.arange(40)
    whole = hash_uniform(1, 1, index, stream=1, count=33)
    monkeypatch.setattr("sfm_hf.augment._MAX_HASH_ELEMENTS", 100)
    assert torch.equal(hash_uniform(1, 1, index, stream=1, count=33), whole)


def test_hash_normal_moments() -> None:
    normals = hash_normal(1, 2, torch.arange(500), stream=4, count=401)
    assert normals.shape == (500, 401)
    assert normals.mean().item() == pytest.approx(0.0, abs=0.01)
    assert normals.std().item() == pytest.approx(1.0, abs=0.01)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(crop_scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        AugmentConfig(noise_std=-1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    index = torch.arange(50, 80)
    cpu = hash_uniform(3, 4, index, stream=1, count=7)
    assert torch.equal(hash_uniform(3, 4, index.cuda(), stream=1, count=7).cpu(), cpu)

    images = _images(n=9)
    on_cpu = augment(images, 16, DEFAULT, seed=1, step=1)
    on_cuda = augment(images.cuda(), 16, DEFAULT, seed=1, step=1)
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    tail = augment(images[4:].cuda(), 16, DEFAULT, seed=1, step=1, index_offset=4)
    assert torch.equal(on_cuda[4:], tail)
