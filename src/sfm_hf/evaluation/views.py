"""Augmented training views: the per-trial view bank and its memory cap."""

from __future__ import annotations

import time
import torch
from accelerate.logging import get_logger

from ..augment import AugmentConfig, augment
from ..backbones import FrozenBackbone
from ..config import AugmentOptions, EvaluateOptions
from ..progress import progress as track
from ..names import short_name

logger = get_logger(__name__)


def training_augmentation(options: AugmentOptions) -> AugmentConfig:
    """Stage III's training views (LGM's evaluation views): the run's flip and crop (``augment``), no noise."""
    return AugmentConfig.from_options(options, noise_p=0.0)


# The views of the default `augment` options.
TRAIN_AUGMENTATION = training_augmentation(AugmentOptions())


class ViewBank:
    """``views`` augmented views of every train image of one trial, through each backbone that asks for them.

    Computed on first use and shared by every training of the trial (its modes, plateau cycles and the ridge
    solve): a trial then forwards ``views x N`` images once per backbone, where fresh views cost ``batch x steps``
    forwards per training. View ``k`` of image ``i`` is the view fresh views give image ``i`` at step ``k``; views
    at the same size are the same through every backbone, as with fresh views.
    """

    def __init__(self, images: torch.Tensor, views: int, seed: int, chunk: int, progress_mode: str = "off",
                 progress_enabled: bool = False, augmentation: AugmentConfig = TRAIN_AUGMENTATION) -> None:
        self.images, self.views, self.seed, self.chunk = images, views, seed, chunk
        self.augmentation = augmentation
        self.progress_mode, self.progress_enabled = progress_mode, progress_enabled
        self._features: dict[tuple[int, int], torch.Tensor] = {}
        # Whichever training asks first pays for the forwards; kept apart so its own seconds stay comparable.
        self.seconds = 0.0

    @torch.no_grad()
    def features(self, backbone: FrozenBackbone, view_size: int) -> torch.Tensor:
        """``[views, N, D]``: view ``k`` of image ``i`` through ``backbone``."""
        key = (id(backbone), view_size)
        if key not in self._features:
            start_time = time.perf_counter()
            # Chunked so a large set is never augmented whole; index_offset keeps each image's views chunk-free.
            starts = range(0, len(self.images), self.chunk)
            per_view = []
            for view in track(range(self.views), desc=f"Stage III: view bank through {short_name(backbone.name)}",
                              unit="view", mode=self.progress_mode, enabled=self.progress_enabled, leave=False):
                parts = [backbone(augment(part, view_size, self.augmentation, seed=self.seed, step=view,
                                          index_offset=start))
                         for start, part in zip(starts, self.images.split(self.chunk))]
                per_view.append(torch.cat(parts))
            self._features[key] = torch.stack(per_view)
            self.seconds += time.perf_counter() - start_time
        return self._features[key]


def bank_views(wanted: int, images: int, feature_widths: int, max_mib: float) -> int:
    """How many of ``wanted`` views of ``images`` images fit ``max_mib`` as float32 features of ``feature_widths``
    summed widths (one per backbone the bank serves)."""
    per_view = images * feature_widths * 4
    return min(wanted, int(max_mib * (1 << 20) // per_view))


def trial_bank(options: EvaluateOptions, images: torch.Tensor, seed: int, feature_widths: int, *,
               progress_mode: str, shown: bool, announce: bool, train_set: str,
               augmentation: AugmentConfig = TRAIN_AUGMENTATION) -> ViewBank | None:
    """The view bank of one trial (``evaluate.view_bank``), cut to what fits ``evaluate.view_bank_max_mib``;
    ``announce`` logs a cut. None: fresh views every step."""
    if not options.view_bank:
        return None
    views = bank_views(options.view_bank, len(images), feature_widths, options.view_bank_max_mib)
    if views < options.view_bank and announce:
        outcome = f"using {views} views per image" if views else "using fresh views every step"
        logger.info(f"Stage III: {train_set}: {options.view_bank} views of {len(images)} images through backbones of "
                    f"{feature_widths} summed features exceed evaluate.view_bank_max_mib="
                    f"{options.view_bank_max_mib:g}: {outcome}.")
    return ViewBank(images, views, seed, options.batch_size, progress_mode, shown, augmentation) if views else None
