"""Frozen vision encoders behind one small interface.

This module loads them; what differs between model families (encoder class, which output is the
feature, default normalisation) is one table, ``ENCODER_FAMILIES`` in :mod:`sfm_hf.modeling_sfm`,
which the exported bundle's remote code reads too. Everything else sees a
:class:`FrozenBackbone`: images in [0, 1] go in, one feature vector per image comes out,
and the preprocessing in between (resize + normalise with the backbone's own statistics)
is made of differentiable torch ops, because Stage II back-propagates into the pixels.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError, describe_error
from .names import OPEN_CLIP_PREFIXES

class BackboneError(UserError):
    """A backbone id or folder that cannot be loaded as a vision encoder."""


@dataclass(frozen=True)
class BackboneInfo:
    """What a run records about the encoder it used."""

    name: str
    family: str
    feature: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FrozenBackbone(nn.Module):
    """A frozen encoder: ``forward(images)`` maps [B, 3, H, W] images in [0, 1] to [B, D] features."""

    def __init__(
        self,
        model: nn.Module,
        extract: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        *,
        name: str,
        family: str,
        feature: str,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self._extract = extract
        self.name = name
        self.family = family
        self.feature = feature
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            probe = torch.full((1, 3, self.image_size, self.image_size), 0.5)
            self.feature_dim = int(self.forward(probe).shape[-1])

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Frozen means frozen: dropout and friends stay off even if a caller flips modes.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the encoder's input size and normalise; differentiable w.r.t. ``images``."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            downsampling = min(images.shape[-2:]) > self.image_size
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                antialias=downsampling,
            )
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._extract(self.model, self.preprocess(images)).float()

    @property
    def info(self) -> BackboneInfo:
        return BackboneInfo(
            name=self.name,
            family=self.family,
            feature=self.feature,
            feature_dim=self.feature_dim,
            image_size=self.image_size,
            mean=tuple(self.mean.flatten().tolist()),
            std=tuple(self.std.flatten().tolist()),
        )

    def describe(self) -> dict:
        return asdict(self.info)


def _transformers_features(read_feature: Callable, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return read_feature(model(pixel_values=pixels))


def _open_clip_image(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return model.encode_image(pixels)


def _is_local_model_folder(name: str) -> bool:
    return Path(name).is_dir()


def _processor_config(name: str) -> dict:
    """The checkpoint's own image processor config, or {} when it ships none (normal for timm)."""
    if _is_local_model_folder(name):
        path = Path(name) / "preprocessor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "preprocessor_config.json")).read_text())
    except Exception:  # noqa: BLE001 -- a missing processor config is not an error
        return {}


def _processor_stats(processor: dict) -> tuple[tuple, tuple] | None:
    if "image_mean" in processor and "image_std" in processor:
        return tuple(processor["image_mean"]), tuple(processor["image_std"])
    return None


def _processor_image_size(processor: dict) -> int | None:
    """The side the processor hands the model: its centre crop, else its resize target.

    It wins over the model config, whose ``image_size`` can be the position-embedding grid the
    model interpolates from (DINOv2 checkpoints say 518 but are used at 224).
    """
    size = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    size = size or processor.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size) if isinstance(size, (int, float)) and size else None


def _config_image_size(config) -> int | None:
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[-1]
    return int(size) if size else None


def _load_transformers(name: str, dtype: torch.dtype | None, attn_implementation: str | None) -> FrozenBackbone:
    from transformers import AutoConfig

    if Path(name).is_file():
        # transformers would read a config.json given directly and then torch.load it as the weights.
        raise BackboneError(
            f"Backbone {name!r} is a file: give the folder that holds the model (config.json and model.safetensors) "
            "or a Hub model id."
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        hint = (
            "the folder has no usable config.json"
            if _is_local_model_folder(name)
            else "it is neither a local folder nor a reachable Hub model (offline? gated? typo?)"
        )
        raise BackboneError(f"Cannot load backbone {name!r}: {hint}. ({error.__class__.__name__}: {error})") from None
    from .modeling_sfm import encoder_family, encoder_features, load_encoder

    family = encoder_family(config.model_type)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = load_encoder(config, name, **kwargs)
    except Exception as error:  # noqa: BLE001 -- missing, truncated, foreign or unsafe (pickled) weights: many types
        # torch's own message on a pickle suggests weights_only=False, which would run whatever the pickle holds.
        reason = (f"{error.__class__.__name__}: a pickle holding objects other than tensors, which is never loaded: it "
                  "could run code") if isinstance(error, pickle.UnpicklingError) else describe_error(error)
        raise BackboneError(
            f"Cannot load the weights of backbone {name!r} ({reason}): the model needs "
            "complete weights (model.safetensors, or a pytorch_model.bin holding tensors only); download or save the "
            "model again."
        ) from None
    if getattr(model, "main_input_name", "pixel_values") != "pixel_values":
        raise BackboneError(
            f"Backbone {name!r} ({config.model_type}) is not a vision encoder: its model reads "
            f"{model.main_input_name!r}, not images. Give an image model (DINOv2, ViT, CLIP, SigLIP, a timm model, ...)."
        )
    processor = _processor_config(name)
    mean, std = _processor_stats(processor) or _timm_stats(config) or (family.mean, family.std)
    image_size = _processor_image_size(processor) or _timm_image_size(config) or _config_image_size(config)
    if image_size is None:
        raise BackboneError(f"Backbone {name!r} ({config.model_type}) does not say its input image size.")
    return FrozenBackbone(
        model, partial(_transformers_features, partial(encoder_features, feature=family.feature)), name=name, family=family.name,
        feature=family.description, image_size=image_size, mean=mean, std=std,
    )


def _timm_stats(config) -> tuple[tuple, tuple] | None:
    """The mean/std a timm checkpoint's ``pretrained_cfg`` records (other families have none)."""
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or {}
    if "mean" in pretrained_cfg and "std" in pretrained_cfg:
        return tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"])
    return None


def _timm_image_size(config) -> int | None:
    """The input size a timm checkpoint's ``model_args`` / ``pretrained_cfg`` record (other families have none)."""
    model_args = getattr(config, "model_args", None) or {}
    if "img_size" in model_args:
        size = model_args["img_size"]
        return int(size[-1] if isinstance(size, (list, tuple)) else size)
    pretrained_cfg = getattr(config, "pretrained_cfg", None) or {}
    if "input_size" in pretrained_cfg:
        return int(pretrained_cfg["input_size"][-1])
    return None


def _load_open_clip(name: str, dtype: torch.dtype | None) -> FrozenBackbone:
    from .modeling_sfm import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    try:
        import open_clip
    except ImportError:
        raise BackboneError(
            f"{name!r} is an open_clip model; install the extra: pip install 'sfm-hf[open_clip]'."
        ) from None
    try:
        model = open_clip.create_model(name)
    except (FileNotFoundError, RuntimeError, ValueError) as error:
        raise BackboneError(f"Cannot load open_clip backbone {name!r}: {error}") from None
    if dtype is not None:
        model = model.to(dtype)
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = preprocess.get("size", getattr(model.visual, "image_size", 224))
    size = size[-1] if isinstance(size, (list, tuple)) else size
    mean = tuple(preprocess.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(preprocess.get("std", OPENAI_CLIP_STD))
    return FrozenBackbone(
        model, _open_clip_image, name=name, family="open_clip", feature="encode_image (projected)",
        image_size=int(size), mean=mean, std=std,
    )


def load_backbone(
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    normalization: str = "backbone",
    attn_implementation: str | None = None,
) -> FrozenBackbone:
    """Load a frozen encoder by Hub id or local folder (transformers), or an open_clip id.

    ``normalization``: 'backbone' keeps the mean/std of the backbone's own processor; 'imagenet'
    replaces them with ImageNet's, as the authors' code does for every model (``data.normalization``).
    ``attn_implementation`` is passed to transformers (None keeps its default, SDPA wherever the
    family supports it); timm and open_clip models pick their own attention (PyTorch's fused kernel
    where available).
    """
    if normalization not in ("backbone", "imagenet"):
        raise ValueError(f"unknown normalization {normalization!r}; expected 'backbone' or 'imagenet'")
    if name.startswith(OPEN_CLIP_PREFIXES):
        backbone = _load_open_clip(name, dtype)
    else:
        backbone = _load_transformers(name, dtype, attn_implementation)
    if normalization == "imagenet":
        from .modeling_sfm import IMAGENET_MEAN, IMAGENET_STD

        backbone.mean.copy_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        backbone.std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    if device is not None:
        backbone = backbone.to(device)
    return backbone
