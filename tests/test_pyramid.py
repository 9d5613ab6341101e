"""Tests for the synthetic image parameterisations in ``sfm_hf.pyramid``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sfm_hf.pyramid import PixelImages, PyramidImages, build_images, growth_due, image_seed


def _grown(images: PyramidImages, times: int) -> PyramidImages:
    for _ in range(times):
        images.grow()
    return images


@pytest.mark.parametrize(
    ("resolution", "expected_sizes"),
    [(32, [1, 2, 4, 8, 16, 32]), (28, [1, 2, 4, 8, 16])],
)
def test_shapes_and_range_at_every_growth(resolution: int, expected_sizes: list[int]) -> None:
    images = PyramidImages(3, resolution, seed=0)
    assert images.level_sizes == expected_sizes[:1]
    for count in range(1, len(expected_sizes) + 1):
        assert images.level_sizes == expected_sizes[:count]
        decoded = images()
        assert decoded.shape == (3, 3, resolution, resolution)
        assert decoded.min() >= 0.0 and decoded.max() <= 1.0
        if count < len(expected_sizes):
            assert images.can_grow()
            images.grow()
    assert not images.can_grow()
    with pytest.raises(RuntimeError):
        images.grow()


def _image_randn(seed: int, index: int, level: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(image_seed(seed, index, level)))


def test_initial_level_is_seeded_randn_per_image() -> None:
    images = PyramidImages(5, 16, seed=7)
    expected = torch.stack([_image_randn(7, i, 0, 3, 1, 1) for i in range(5)])
    torch.testing.assert_close(images.levels[0].detach(), expected, rtol=0, atol=0)


def test_a_slice_of_images_equals_the_same_rows_of_the_whole_set() -> None:
    whole = _grown(PyramidImages(6, 16, seed=3), 3)
    part = _grown(PyramidImages(2, 16, seed=3, index_offset=4), 3)
    assert torch.equal(part(), whole()[4:])
    pixels = PixelImages(2, 8, seed=3, index_offset=1)
    assert torch.equal(pixels(), PixelImages(4, 8, seed=3)()[1:3])


def test_growth_rescales_existing_levels() -> None:
    images = _grown(PyramidImages(2, 16, seed=1), 2)
    old_levels = [level.detach().clone() for level in images.levels]
    old_logits = images.decode_logits().detach()
    old_len = len(old_levels)

    images.grow()
    new_len = old_len + 1
    factor = old_len / new_len
    for old, new in zip(old_levels, images.levels):
        torch.testing.assert_close(new.detach(), old * factor)

    new_level = images.levels[-1].detach()
    assert new_level.shape == (2, 3, 8, 8)
    upsampled = F.interpolate(new_level, size=(16, 16), mode="bilinear", align_corners=False)
    new_contribution = torch.einsum("ij,njhw->nihw", images.color_matrix, upsampled)
    torch.testing.assert_close(
        images.decode_logits().detach(), old_logits * factor + new_contribution
    )


def test_new_level_is_randn_over_new_length() -> None:
    images = PyramidImages(2, 8, seed=4)
    images.grow()
    expected = torch.stack([_image_randn(4, i, 1, 3, 2, 2) for i in range(2)]) / 2
    torch.testing.assert_close(images.levels[1].detach(), expected, rtol=0, atol=0)


def test_color_matrix_normalised_by_largest_column() -> None:
    matrix = PyramidImages(1, 4).color_matrix
    assert matrix.norm(dim=0).max().item() == pytest.approx(1.0)
    raw = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    torch.testing.assert_close(matrix, raw / raw.norm(dim=0).max())


def test_decorrelate_false_skips_colour_mixing() -> None:
    images = _grown(PyramidImages(2, 8, seed=2, decorrelate=False), 3)
    total = sum(
        F.interpolate(level, size=(8, 8), mode="bilinear", align_corners=False)
        for level in images.levels
    )
    expected = torch.sigmoid(2.0 * total)
    torch.testing.assert_close(images(), expected)


def test_same_seed_is_deterministic_and_seeds_differ() -> None:
    first = _grown(PyramidImages(2, 16, seed=3), 4)
    second = _grown(PyramidImages(2, 16, seed=3), 4)
    other = _grown(PyramidImages(2, 16, seed=4), 4)
    assert torch.equal(first(), second())
    assert not torch.equal(first(), other())


def test_gradients_reach_every_level() -> None:
    images = _grown(PyramidImages(2, 16, seed=0), 4)
    (images() * torch.randn(2, 3, 16, 16)).sum().backward()
    for level in images.levels:
        assert level.grad is not None
        assert level.grad.abs().sum() > 0


def test_loaded_levels_then_growth_match_the_original() -> None:
    source = _grown(PyramidImages(2, 32, seed=5), 2)
    with torch.no_grad():
        source.levels[0].add_(1.0)  # make the state differ from a fresh instance
    levels = [level.detach().clone() for level in source.levels]

    restored = PyramidImages(2, 32, seed=5)
    restored.load_levels(levels)
    assert torch.equal(restored(), source())

    source.grow()
    restored.grow()
    assert restored.level_sizes == source.level_sizes
    assert torch.equal(restored(), source())


def test_state_dict_round_trip_with_more_levels() -> None:
    source = _grown(PyramidImages(2, 16, seed=6), 3)
    state = source.state_dict()

    restored = PyramidImages(2, 16, seed=6)
    restored.load_state_dict(state)
    assert restored.level_sizes == source.level_sizes
    assert torch.equal(restored(), source())
    source.grow()
    restored.grow()
    assert torch.equal(restored(), source())


def test_state_dict_round_trip_when_nested() -> None:
    class Holder(torch.nn.Module):
        def __init__(self, seed: int) -> None:
            super().__init__()
            self.images = PyramidImages(2, 8, seed=seed)

    source = Holder(seed=1)
    _grown(source.images, 2)
    restored = Holder(seed=2)
    restored.load_state_dict(source.state_dict())
    assert torch.equal(restored.images(), source.images())


def test_load_levels_rejects_bad_shapes() -> None:
    images = PyramidImages(2, 8)
    with pytest.raises(ValueError):
        images.load_levels([])
    with pytest.raises(ValueError):
        images.load_levels([torch.zeros(2, 3, 1, 1), torch.zeros(2, 3, 3, 3)])
    with pytest.raises(ValueError):
        images.load_levels([torch.zeros(2, 3, 2 ** i, 2 ** i) for i in range(5)])


def test_pixel_images() -> None:
    images = PixelImages(3, 12, seed=2)
    expected = 0.1 * torch.stack([_image_randn(2, i, 0, 3, 12, 12) for i in range(3)])
    torch.testing.assert_close(images.levels[0].detach(), expected, rtol=0, atol=0)
    assert images.level_sizes == [12]
    assert not images.can_grow()
    with pytest.raises(RuntimeError):
        images.grow()
    torch.testing.assert_close(images(), torch.sigmoid(2.0 * expected))

    images().sum().backward()
    assert images.levels[0].grad is not None

    restored = PixelImages(3, 12, seed=0)
    restored.load_state_dict(images.state_dict())
    assert torch.equal(restored(), images())
    with pytest.raises(ValueError):
        restored.load_levels([torch.zeros(3, 3, 6, 6)])


def test_build_images() -> None:
    assert isinstance(build_images("pyramid", 2, 8, seed=0), PyramidImages)
    assert not build_images("pyramid", 2, 8, seed=0, decorrelate=False).decorrelate
    assert isinstance(build_images("pixel", 2, 8, seed=0), PixelImages)
    with pytest.raises(ValueError, match="unknown image parameterisation"):
        build_images("voxel", 2, 8, seed=0)


def test_growth_due() -> None:
    due = [step for step in range(1000) if growth_due(step, 200)]
    assert due == [200, 400, 600, 800]
    with pytest.raises(ValueError):
        growth_due(5, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_growth_on_cuda_matches_cpu() -> None:
    on_cpu = _grown(PyramidImages(2, 16, seed=8), 3)
    on_cuda = PyramidImages(2, 16, seed=8).cuda()
    _grown(on_cuda, 3)
    assert all(level.is_cuda for level in on_cuda.levels)
    torch.testing.assert_close(on_cuda().cpu(), on_cpu(), atol=1e-5, rtol=1e-5)


def _start(num_images: int, resolution: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_images, 3, resolution, resolution, generator=generator) * 0.9 + 0.05


@pytest.mark.parametrize("kind, decorrelate", [("pyramid", True), ("pyramid", False), ("pixel", True)])
def test_a_start_image_is_decoded_exactly_and_growth_keeps_it(kind: str, decorrelate: bool) -> None:
    start = _start(4, 16)
    images = build_images(kind, 4, 16, seed=0, decorrelate=decorrelate, start=start)
    assert torch.allclose(images(), start, atol=1e-5, rtol=0)
    while images.can_grow():
        images.grow()
        assert torch.allclose(images(), start, atol=1e-5, rtol=0)


def test_a_start_is_clamped_inside_the_open_interval_and_can_still_be_edited() -> None:
    from sfm_hf.pyramid import START_MARGIN

    start = _start(2, 8)
    start[:, :, :4] = 0.0
    start[:, :, 4:6] = 1.0
    images = PyramidImages(2, 8, seed=0, start=start)
    decoded = images()
    assert torch.isfinite(decoded).all()
    assert torch.allclose(decoded, start.clamp(START_MARGIN, 1 - START_MARGIN), atol=1e-5, rtol=0)
    _grown(images, 3)
    optimizer = torch.optim.Adam(images.parameters(), lr=0.05)
    for _ in range(5):
        loss = images().mean()  # darken every pixel, saturated ones included
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (images() < decoded).all()


def test_a_start_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="start images must have shape"):
        PyramidImages(2, 8, seed=0, start=torch.rand(2, 3, 16, 16))


def test_a_start_survives_a_level_reload_as_in_a_resumed_run() -> None:
    start = _start(3, 8)
    trained = _grown(PyramidImages(3, 8, seed=0, start=start), 2)
    with torch.no_grad():
        for level in trained.levels:
            level.add_(0.1)
    resumed = PyramidImages(3, 8, seed=0, start=start)
    resumed.load_levels([level.detach() for level in trained.levels])
    assert torch.equal(resumed(), trained())
