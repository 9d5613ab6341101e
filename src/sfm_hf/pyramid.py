"""Learnable synthetic images for Stage II distillation.

Two parameterisations share one interface:

* :class:`PyramidImages` -- the multi-scale "pyramid" of Linear Gradient Matching
  (after Lucid): a stack of levels of size 1, 2, 4, ... that are upsampled to full
  resolution, summed, colour-decorrelated and squashed with ``sigmoid(2x)``. Training
  starts with the 1x1 level only and :meth:`PyramidImages.grow` adds a finer level
  every few hundred steps (see :func:`growth_due`).
* :class:`PixelImages` -- plain per-pixel parameters, kept as an ablation.

Both keep their parameters in ``levels`` (a ``ParameterList``); ``state_dict()`` /
``load_state_dict()`` restore them even when the number of levels differs from a freshly
constructed instance. Random values depend only on (seed, global image index, level).

Both can start from given images instead of noise (``start``): the start's logits are a fixed
offset added after the colour mixing, every level starts at zero and levels added later start at
zero too, so the decoded images equal the start (clamped to ``[START_MARGIN, 1 - START_MARGIN]``)
until the optimiser moves them; the levels then learn a coarse-to-fine edit of the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LUCID_COLOR_CORRELATION",
    "START_MARGIN",
    "PixelImages",
    "PyramidImages",
    "build_images",
    "growth_due",
    "image_seed",
    "start_logits",
]

# Square root of the ImageNet colour covariance as used by Lucid; mixing independent
# "decorrelated" channels through it makes early optimisation steps change colours in
# natural proportions instead of pushing R, G and B independently.
LUCID_COLOR_CORRELATION: tuple[tuple[float, float, float], ...] = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)


# Pixels at exactly 0 or 1 have no finite logit; a start is clamped this far inside (2.55 grey levels), which
# also keeps sigmoid's slope at saturated pixels (black MNIST background) at 2% of its peak instead of ~0.
START_MARGIN = 0.01


def start_logits(images: Tensor) -> Tensor:
    """Logits ``x`` with ``sigmoid(2x)`` equal to ``images`` clamped to ``[START_MARGIN, 1 - START_MARGIN]``."""
    return 0.5 * torch.logit(images.float().clamp(START_MARGIN, 1 - START_MARGIN))


def _normalised_color_matrix() -> Tensor:
    """Lucid's colour matrix divided by its largest column L2 norm."""
    matrix = torch.tensor(LUCID_COLOR_CORRELATION, dtype=torch.float32)
    return matrix / matrix.norm(dim=0).max()


class _SyntheticImages(nn.Module):
    """Shared state handling: a list of levels whose random values depend only on the image.

    Every random value of image ``i`` comes from a generator seeded by (seed, index_offset + i,
    level), so a process holding a slice of the global image set creates exactly the values
    that one process holding all images would, and a resumed run grows the same new levels.
    Subclasses define the level layout (:meth:`_check_levels`) and the decoding
    (:meth:`decode_logits`); images are ``sigmoid(2 * (logits + start offset))``.
    """

    def __init__(self, num_images: int, resolution: int, seed: int, index_offset: int,
                 start: Tensor | None = None) -> None:
        super().__init__()
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.num_images = num_images
        self.resolution = resolution
        self.seed = seed
        self.index_offset = index_offset
        self.levels = nn.ParameterList()
        if start is not None and tuple(start.shape) != (num_images, 3, resolution, resolution):
            raise ValueError(
                f"start images must have shape {(num_images, 3, resolution, resolution)}, got {tuple(start.shape)}"
            )
        # Not persistent: a run rebuilds its start from the data, so checkpoints hold only the levels.
        offset = start_logits(start) if start is not None else torch.zeros(())
        self.register_buffer("start_offset", offset, persistent=False)
        self.has_start = start is not None

    @property
    def level_sizes(self) -> list[int]:
        """Spatial size of each level, coarsest first."""
        return [int(level.shape[-1]) for level in self.levels]

    def can_grow(self) -> bool:
        """Whether :meth:`grow` may add another level."""
        return False

    def grow(self) -> None:
        """Add a finer level; only the pyramid supports this."""
        raise RuntimeError(f"{type(self).__name__} has a fixed set of levels and cannot grow")

    def decode_logits(self) -> Tensor:
        """Pre-activation images ``[N, 3, resolution, resolution]``."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        """Decoded images ``[N, 3, resolution, resolution]`` in ``[0, 1]``."""
        logits = self.decode_logits()
        return torch.sigmoid(2.0 * (logits + self.start_offset.to(logits.dtype)))

    def _initial_level(self, level: int, *shape: int) -> Tensor:
        """A new level's values: zeros over a start image (the decode must stay the start), else noise."""
        if self.has_start:
            return torch.zeros(self.num_images, *shape, **self._level_placement())
        return self._randn(level, *shape)

    def _randn(self, level: int, *shape: int) -> Tensor:
        """Standard normals ``[N, *shape]`` for ``level``, one seeded CPU generator per image.

        CPU generation keeps the values identical whatever device the module lives on.
        """
        samples = [
            torch.randn(*shape, generator=torch.Generator().manual_seed(image_seed(self.seed, index, level)))
            for index in range(self.index_offset, self.index_offset + self.num_images)
        ]
        return torch.stack(samples).to(**self._level_placement())

    def _level_placement(self) -> dict[str, torch.device | torch.dtype]:
        if len(self.levels) == 0:
            return {"device": torch.device("cpu"), "dtype": torch.float32}
        reference = self.levels[0]
        return {"device": reference.device, "dtype": reference.dtype}

    def _check_levels(self, tensors: list[Tensor]) -> None:
        """Raise ``ValueError`` unless ``tensors`` form a valid set of levels."""
        raise NotImplementedError

    def load_levels(self, tensors: list[Tensor]) -> None:
        """Replace all levels with copies of ``tensors`` (coarsest first).

        The copies keep the device and dtype of the current levels. New ``Parameter``
        objects are created, so any optimiser must be rebuilt afterwards.
        """
        tensors = list(tensors)
        self._check_levels(tensors)
        placement = self._level_placement()
        self.levels = nn.ParameterList(
            nn.Parameter(tensor.detach().to(**placement).clone()) for tensor in tensors
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # ``nn.Module.load_state_dict`` visits this module before its children, so
        # resizing ``levels`` here lets a checkpoint with more (or fewer) levels than a
        # fresh instance load, whether this module is the root or nested inside another.
        level_prefix = prefix + "levels."
        stored = {
            int(key[len(level_prefix) :]): value
            for key, value in state_dict.items()
            if key.startswith(level_prefix) and key[len(level_prefix) :].isdigit()
        }
        if stored and sorted(stored) == list(range(len(stored))):
            self.load_levels([stored[i] for i in range(len(stored))])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class PyramidImages(_SyntheticImages):
    """Multi-scale synthetic images that start at 1x1 and double in detail on growth.

    Args:
        num_images: number of synthetic images ``N``.
        resolution: output side length; need not be a power of two (levels are
            1, 2, 4, ... up to the largest power of two ``<= resolution`` and every level
            is bilinearly upsampled to ``resolution``).
        seed: with the image's global index, seeds the initial level and every later one.
        index_offset: global index of the first image (a process holding a slice of the set).
        decorrelate: mix channels through Lucid's colour matrix before the sigmoid.
        start: images ``[N, 3, resolution, resolution]`` in [0, 1] to start from instead of noise.
            Their logits are added after the colour mixing (equivalent to adding the inverse-mixed
            logits to the sum of levels, without inverting the matrix), so decorrelation still shapes
            every later edit.
    """

    def __init__(
        self,
        num_images: int,
        resolution: int,
        *,
        seed: int = 0,
        decorrelate: bool = True,
        index_offset: int = 0,
        start: Tensor | None = None,
    ) -> None:
        super().__init__(num_images, resolution, seed, index_offset, start)
        self.decorrelate = decorrelate
        self.register_buffer("color_matrix", _normalised_color_matrix(), persistent=False)
        self.levels.append(nn.Parameter(self._initial_level(0, 3, 1, 1)))

    def can_grow(self) -> bool:
        """False once a level twice the newest size would exceed ``resolution``."""
        return self.level_sizes[-1] * 2 <= self.resolution

    def grow(self) -> None:
        """Add a level at twice the newest size.

        Existing levels are scaled by ``old_len / new_len`` and the new level is
        ``randn / new_len``, as in the authors' code, so the decoded logits keep a
        comparable scale; over a start image the new level is zeros (no noise on a real
        image). The new level is a new ``Parameter``: rebuild the optimiser (the authors
        re-create Adam, discarding its moments).
        """
        if not self.can_grow():
            raise RuntimeError(
                f"cannot grow beyond level size {self.level_sizes[-1]} "
                f"at resolution {self.resolution}"
            )
        old_len = len(self.levels)
        new_len = old_len + 1
        new_size = self.level_sizes[-1] * 2
        with torch.no_grad():
            for level in self.levels:
                level.mul_(old_len / new_len)
        new_level = self._initial_level(old_len, 3, new_size, new_size) / new_len
        self.levels.append(nn.Parameter(new_level))

    def decode_logits(self) -> Tensor:
        """Upsampled sum of all levels, colour-decorrelated, before the sigmoid."""
        size = (self.resolution, self.resolution)
        total = sum(
            # A level already at full size would be resampled onto itself.
            level
            if level.shape[-1] == self.resolution
            else F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            for level in self.levels
        )
        if not self.decorrelate:
            return total
        return torch.einsum("ij,njhw->nihw", self.color_matrix.to(total.dtype), total)

    def _check_levels(self, tensors: list[Tensor]) -> None:
        if not tensors:
            raise ValueError("a pyramid needs at least one level")
        for index, tensor in enumerate(tensors):
            size = 2**index
            expected = (self.num_images, 3, size, size)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"level {index} must have shape {expected}, got {tuple(tensor.shape)}"
                )
            if size > self.resolution:
                raise ValueError(
                    f"level {index} (size {size}) exceeds resolution {self.resolution}"
                )


class PixelImages(_SyntheticImages):
    """Plain per-pixel synthetic images: one level ``[N, 3, res, res]``, no growth.

    Initialised with ``0.1 * randn`` (so images start near mid-grey) from a generator
    seeded with ``seed``, or at zero over ``start`` images; images are ``sigmoid(2x)``.
    """

    def __init__(self, num_images: int, resolution: int, *, seed: int = 0, index_offset: int = 0,
                 start: Tensor | None = None) -> None:
        super().__init__(num_images, resolution, seed, index_offset, start)
        self.levels.append(nn.Parameter(0.1 * self._initial_level(0, 3, resolution, resolution)))

    def decode_logits(self) -> Tensor:
        """The pixel parameters themselves."""
        return self.levels[0]

    def _check_levels(self, tensors: list[Tensor]) -> None:
        expected = (self.num_images, 3, self.resolution, self.resolution)
        if len(tensors) != 1 or tuple(tensors[0].shape) != expected:
            shapes = [tuple(tensor.shape) for tensor in tensors]
            raise ValueError(f"pixel images need exactly one level of shape {expected}, got {shapes}")


def build_images(
    kind: str,
    num_images: int,
    resolution: int,
    *,
    seed: int,
    decorrelate: bool = True,
    index_offset: int = 0,
    start: Tensor | None = None,
) -> PyramidImages | PixelImages:
    """Construct synthetic images by name.

    Args:
        kind: ``"pyramid"`` or ``"pixel"``.
        num_images: number of synthetic images.
        resolution: output side length.
        seed: initialisation seed.
        index_offset: global index of the first image.
        decorrelate: colour decorrelation for the pyramid; plain pixels have none, so it
            is ignored for ``"pixel"``.
        start: images in [0, 1] to start from (decoded exactly at step 0); None starts from noise.
    """
    if kind == "pyramid":
        return PyramidImages(
            num_images, resolution, seed=seed, decorrelate=decorrelate, index_offset=index_offset, start=start
        )
    if kind == "pixel":
        return PixelImages(num_images, resolution, seed=seed, index_offset=index_offset, start=start)
    raise ValueError(f"unknown image parameterisation {kind!r}; expected 'pyramid' or 'pixel'")


def image_seed(seed: int, index: int, level: int) -> int:
    """A generator seed for one (run seed, global image index, level); distinct for distinct triples."""
    return (seed * 1_000_003 + index) * 64 + level


def growth_due(step: int, every: int) -> bool:
    """Whether to add a pyramid level before 0-indexed ``step``.

    True at steps ``every, 2 * every, ...``, i.e. the authors' 1-indexed steps
    ``every + 1, 2 * every + 1, ...`` (201, 401, ... for ``every=200``). The caller still
    checks :meth:`PyramidImages.can_grow`.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return step > 0 and step % every == 0
