"""Differentiable per-sample augmentation for Stage II distillation.

Every random number is a pure function of ``(seed, step, global image index,
purpose)`` computed by a counter-based integer hash, never drawn from a sequential
generator. An image therefore receives the same flip, crop and noise whether the image
set is processed in one process or split across ranks, in any batch slicing, and on CPU
or CUDA (the uniforms come from integer ops only; the Gaussian noise additionally uses
``log``/``cos``, which may differ between devices in the last bit).

The geometric part is one ``grid_sample`` per batch (the affine crop grid is built
element-wise), so gradients flow back to the input pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .config import AugmentOptions

__all__ = [
    "AugmentConfig",
    "augment",
    "center_resize",
    "hash_normal",
    "hash_uniform",
]

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B
# Distinguishes this generator's streams from any other use of the same hash.
_SALT = 0x5F3759DF
# Bounds the int64 temporaries of one hashing pass (4 Mi elements = 32 MiB each); the
# per-pixel noise of a large batch would otherwise need gigabytes at once.
_MAX_HASH_ELEMENTS = 1 << 22
# 23 random bits map to odd multiples of 2**-24, all exactly representable in float32
# and strictly inside (0, 1), so log() in Box-Muller never sees 0.
_UNIFORM_BITS = 23

# One stream per purpose keeps the draws for different decisions independent.
_STREAM_FLIP = 1
_STREAM_CROP = 2
_STREAM_NOISE_GATE = 3
_STREAM_NOISE = 4

# The share of views flipped when flipping is on: torchvision's RandomHorizontalFlip, the authors' recipe.
FLIP_P = 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation hyper-parameters (defaults follow the SFM/LGM Stage II recipe).

    Attributes:
        flip_p: probability of a horizontal flip.
        crop_scale: range of the crop's area as a fraction of the image area.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled
            log-uniformly.
        noise_std: standard deviation of the additive per-pixel Gaussian noise.
        noise_p: probability that an image receives noise at all.
        noise_mean: mean of the noise (the older LGM code used 0.5, current code 0.0).
    """

    flip_p: float = FLIP_P
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    noise_std: float = 0.2
    noise_p: float = 0.5
    noise_mean: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_p", "noise_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(low, high)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    @classmethod
    def from_options(cls, options: AugmentOptions, **noise: float) -> AugmentConfig:
        """The flip and crop of a run's ``augment`` section, with ``noise`` (``noise_p`` etc.) as given."""
        low, high = options.crop_scale
        return cls(flip_p=FLIP_P if options.flip else 0.0, crop_scale=(low, high), **noise)


def _hash32(x: Tensor | int) -> Tensor | int:
    """Integer avalanche hash on values in ``[0, 2**32)``.

    Each product is below ``2**32 * 0x45D9F3B < 2**59``, so int64 tensors never overflow
    and Python ints give bit-identical results.
    """
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    x = (((x >> 16) ^ x) * _HASH_MULTIPLIER) & _MASK32
    return (x >> 16) ^ x


def _absorb(state: Tensor | int, value: Tensor | int) -> Tensor | int:
    """Fold a 64-bit ``value`` into a 32-bit hash ``state`` (low word, then high word)."""
    state = _hash32((value & _MASK32) ^ state)
    return _hash32(((value >> 32) & _MASK32) ^ state)


def _hash_bits(seed: int, step: int, index: Tensor, stream: int, count: int) -> Tensor:
    """32-bit hashes ``[len(index), count]`` of ``(seed, step, index[i], stream, j)``."""
    key = _hash32(_SALT)
    for value in (seed, step, stream):
        key = _absorb(key, value)
    per_index = _absorb(key, index.to(torch.long))
    counter = torch.arange(count, dtype=torch.long, device=index.device)
    return _absorb(per_index[:, None], counter[None, :])


def hash_uniform(seed: int, step: int, index: Tensor, stream: int, count: int) -> Tensor:
    """Uniform numbers in the open interval (0, 1), one row per index.

    Entry ``[i, j]`` depends only on ``(seed, step, index[i], stream, j)``, so any slice
    of ``index`` yields the matching rows, on any device.

    Args:
        seed: run seed.
        step: training step (or any other outer counter).
        index: 1-D integer tensor of global sample indices; the result is on its device.
        stream: purpose identifier; different streams are independent.
        count: numbers per index.

    Returns:
        float32 tensor ``[len(index), count]`` with values ``(2k + 1) / 2**24``.
    """
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out = torch.empty(len(index), count, dtype=torch.float32, device=index.device)
    rows_per_chunk = max(1, _MAX_HASH_ELEMENTS // max(count, 1))
    for start in range(0, len(index), rows_per_chunk):
        bits = _hash_bits(seed, step, index[start : start + rows_per_chunk], stream, count)
        top_bits = (bits >> (32 - _UNIFORM_BITS)).to(torch.float32)
        out[start : start + rows_per_chunk] = (top_bits + 0.5) / float(1 << _UNIFORM_BITS)
    return out


def hash_normal(seed: int, step: int, index: Tensor, stream: int, count: int) -> Tensor:
    """Standard normal numbers via Box-Muller on :func:`hash_uniform` draws.

    Same purity guarantees as :func:`hash_uniform` (``stream`` must not be reused for
    uniforms of the same ``(seed, step)``).

    Returns:
        float32 tensor ``[len(index), count]``.
    """
    pairs = (count + 1) // 2
    uniforms = hash_uniform(seed, step, index, stream, 2 * pairs)
    radius = torch.sqrt(-2.0 * torch.log(uniforms[:, :pairs]))
    angle = (2.0 * math.pi) * uniforms[:, pairs:]
    normals = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return normals[:, :count]


def _sampling_grid(
    index: Tensor,
    height: int,
    width: int,
    out_size: int,
    config: AugmentConfig,
    seed: int,
    step: int,
    dtype: torch.dtype,
) -> Tensor:
    """``grid_sample`` grid ``[N, out_size, out_size, 2]`` for flip + random-resized-crop.

    In normalised coordinates a crop of width fraction ``w`` centred at ``cx`` maps output
    ``x`` to input ``w * x + cx``, and a flip negates ``w``. This is the grid
    ``affine_grid`` would build from a diagonal ``theta``, but written element-wise so
    each sample's coordinates are bit-identical whatever the batch size (a batched matmul
    may change its summation order with the batch).
    """
    crop = hash_uniform(seed, step, index, _STREAM_CROP, 4).to(dtype)
    area_u, ratio_u, centre_x_u, centre_y_u = crop.unbind(dim=1)
    scale_low, scale_high = config.crop_scale
    area = scale_low + (scale_high - scale_low) * area_u
    log_ratio_low, log_ratio_high = (math.log(r) for r in config.crop_ratio)
    ratio = torch.exp(log_ratio_low + (log_ratio_high - log_ratio_low) * ratio_u)
    # Fractions of the input's width and height such that the crop covers ``area`` of
    # the image with pixel aspect ``ratio`` (as torchvision does); clamping replaces
    # torchvision's retry loop for crops that would not fit.
    aspect = height / width
    width_fraction = torch.sqrt(area * ratio * aspect).clamp(max=1.0)
    height_fraction = torch.sqrt(area / ratio / aspect).clamp(max=1.0)
    centre_x = (2.0 * centre_x_u - 1.0) * (1.0 - width_fraction)
    centre_y = (2.0 * centre_y_u - 1.0) * (1.0 - height_fraction)

    flip = hash_uniform(seed, step, index, _STREAM_FLIP, 1)[:, 0] < config.flip_p
    x_scale = torch.where(flip, -width_fraction, width_fraction)

    # Output pixel centres for align_corners=False.
    positions = torch.arange(out_size, dtype=dtype, device=index.device)
    base = (2.0 * positions + 1.0) / out_size - 1.0
    grid_x = x_scale[:, None] * base[None, :] + centre_x[:, None]
    grid_y = height_fraction[:, None] * base[None, :] + centre_y[:, None]
    return torch.stack(
        [
            grid_x[:, None, :].expand(-1, out_size, -1),
            grid_y[:, :, None].expand(-1, -1, out_size),
        ],
        dim=-1,
    )


def _add_noise(
    views: Tensor, index: Tensor, config: AugmentConfig, seed: int, step: int
) -> Tensor:
    """Add ``N(noise_mean, noise_std**2)`` per pixel to the images selected by the gate."""
    if config.noise_p == 0.0:
        return views
    gate = hash_uniform(seed, step, index, _STREAM_NOISE_GATE, 1)[:, 0] < config.noise_p
    noised = gate.nonzero().squeeze(1)
    if len(noised) == 0:
        return views
    # Only the gated images get normals drawn, which halves the hashing work at p=0.5
    # and is still slicing-invariant because each row depends only on its own index.
    per_image = views[0].numel()
    normals = hash_normal(seed, step, index[noised], _STREAM_NOISE, per_image)
    noise = torch.zeros_like(views)
    noise[noised] = (config.noise_mean + config.noise_std * normals).to(views.dtype).view(
        len(noised), *views.shape[1:]
    )
    return views + noise


def augment(
    images: Tensor,
    out_size: int,
    config: AugmentConfig,
    *,
    seed: int,
    step: int,
    index_offset: int = 0,
    image_ids: Tensor | None = None,
) -> Tensor:
    """Flip, random-resized-crop and noise each image independently.

    Args:
        images: ``[N, C, H, W]`` images in ``[0, 1]``, any float dtype and device.
        out_size: side length of the square output views.
        config: augmentation hyper-parameters.
        seed: run seed.
        step: training step; a new step gives new augmentations.
        index_offset: global index of ``images[0]``; image ``i`` is augmented as global
            image ``index_offset + i``, so ranks holding slices reproduce a single
            process exactly.
        image_ids: global index of each image instead (``[N]`` int64): a batch drawn from a
            set in any order is augmented as each image's own view of ``step``.

    Returns:
        ``[N, C, out_size, out_size]`` views in the input dtype, not clamped (noise may
        leave ``[0, 1]``; the backbone's normalisation follows). Differentiable with
        respect to ``images``. Resampling is plain bilinear (no antialiasing).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    num_images, _, height, width = images.shape
    if image_ids is None:
        index = torch.arange(num_images, dtype=torch.long, device=images.device) + index_offset
    else:
        index = image_ids.to(device=images.device, dtype=torch.long)
    # Sampling coordinates need more precision than bf16/fp16 offer (about half a pixel
    # at 224 px), so resampling and noise run in at least float32.
    work_dtype = torch.promote_types(images.dtype, torch.float32)
    grid = _sampling_grid(index, height, width, out_size, config, seed, step, work_dtype)
    # Crops always lie inside the image, so padding only decides the outer half pixel,
    # where "border" repeats the edge like ``F.interpolate`` does.
    views = F.grid_sample(
        images.to(work_dtype), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    views = _add_noise(views, index, config, seed, step)
    return views.to(images.dtype)


def center_resize(images: Tensor, out_size: int) -> Tensor:
    """Deterministic evaluation view: centre square crop, then bilinear resize.

    Uses the same bilinear, non-antialiased resampling as :func:`augment`; for square
    inputs it equals :func:`augment` with the identity crop and no flip or noise.

    Args:
        images: ``[N, C, H, W]`` images.
        out_size: output side length.

    Returns:
        ``[N, C, out_size, out_size]`` in the input dtype.
    """
    height, width = images.shape[-2:]
    side = min(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    square = images[..., top : top + side, left : left + side]
    if side == out_size:
        return square
    return F.interpolate(square, size=(out_size, out_size), mode="bilinear", align_corners=False)
