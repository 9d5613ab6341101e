"""The SFM classifier bundle: logits = golden(P(phi_e(x))) (classifier inheritance, Eq. 11 of the paper).

phi_e is a frozen evaluation encoder, P a linear projector trained on the synthetic images to map
phi_e's features into the distillation backbone's feature space, and the golden classifier a
linear head trained on the full real dataset in that space.

This file travels to the Hub as remote code beside the weights, so it imports only torch,
transformers and its sibling ``configuration_sfm``; loading it never needs ``sfm_hf``.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, ImageClassificationPipeline, PreTrainedModel, image_utils
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_sfm import SFMConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderFamily(NamedTuple):
    """How the checkpoints of one family load as a frozen encoder, and which of its outputs is the feature.

    The one table of model families: ``sfm_hf.backbones`` loads every transformers backbone through it
    and the bundle below rebuilds its encoder from it (this file may import nothing from sfm_hf, so the
    table lives here).
    """

    # ``config.model_type`` of the family's checkpoints and of their vision sub-config (the bundle saves the latter).
    model_types: tuple[str, ...]
    # The output used as phi(x): an attribute of the model output, or "cls_token" (last_hidden_state[:, 0]).
    feature: str
    # What the feature is, as statistics.json and the cards say it.
    description: str
    # The transformers class the encoder loads as (resolved on use: importing every family's modelling code up
    # front costs seconds); None: AutoModel.
    encoder_class: str | None = None
    encoder_kwargs: dict | None = None
    # What the family is recorded as; None: the checkpoint's model_type.
    name: str | None = None
    # Normalisation when the checkpoint ships no image processor saying its own.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


ENCODER_FAMILIES = (
    EncoderFamily(("clip", "clip_vision_model"), "image_embeds", "image_embeds (projected CLS)",
                  "CLIPVisionModelWithProjection", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    EncoderFamily(("siglip", "siglip_vision_model"), "pooler_output", "pooler_output (attention-pooled)",
                  "SiglipVisionModel", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    EncoderFamily(("vit", "deit"), "cls_token", "CLS token after the final LayerNorm",
                  encoder_kwargs={"add_pooling_layer": False}),
    EncoderFamily(("timm_wrapper",), "pooler_output", "pooler_output (timm pre-logits)", name="timm"),
    EncoderFamily(("dinov2", "dinov2_with_registers", "dinov3_vit", "dinov3_convnext"), "pooler_output",
                  "pooler_output (CLS after the final LayerNorm)"),
)
# Any other AutoModel vision encoder.
OTHER_ENCODERS = EncoderFamily((), "pooler_output", "pooler_output")


def encoder_family(model_type: str) -> EncoderFamily:
    """The family of a checkpoint's (or vision sub-config's) ``model_type``, named as it is recorded."""
    family = next((family for family in ENCODER_FAMILIES if model_type in family.model_types), OTHER_ENCODERS)
    return family if family.name else family._replace(name=model_type)


def feature_output(model_type: str) -> str:
    """The encoder output used as phi_e(x): image_embeds (CLIP), cls_token (ViT/DeiT) or pooler_output."""
    return encoder_family(model_type).feature


def encoder_features(outputs, feature: str) -> torch.Tensor:
    """The feature ``feature`` (an EncoderFamily's) from an encoder's outputs."""
    if feature == "cls_token":
        return outputs.last_hidden_state[:, 0]
    return getattr(outputs, feature)


def _encoder_class(family: EncoderFamily):
    return getattr(transformers, family.encoder_class) if family.encoder_class else AutoModel


def build_encoder(vision_config) -> nn.Module:
    """A randomly initialised encoder of the checkpoint family described by ``vision_config``."""
    family = encoder_family(vision_config.model_type)
    encoder_class = _encoder_class(family)
    if encoder_class is AutoModel:
        return AutoModel.from_config(vision_config, **(family.encoder_kwargs or {}))
    return encoder_class(vision_config, **(family.encoder_kwargs or {}))


def load_encoder(config, checkpoint: str, **kwargs) -> nn.Module:
    """The pretrained encoder of ``checkpoint`` (``config``: its config or vision sub-config), as ``build_encoder``'s class."""
    family = encoder_family(config.model_type)
    return _encoder_class(family).from_pretrained(checkpoint, **{**(family.encoder_kwargs or {}), **kwargs})


class SFMForImageClassification(PreTrainedModel):
    """Frozen encoder -> linear projector -> golden linear classifier; ``forward(pixel_values)`` gives logits."""

    config_class = SFMConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True

    def __init__(self, config: SFMConfig) -> None:
        super().__init__(config)
        self.vision_model = build_encoder(config.vision_config)
        self.projector = nn.Linear(config.feature_dim, config.distill_feature_dim)
        self.classifier = nn.Linear(config.distill_feature_dim, config.num_labels)
        self.feature_output = feature_output(config.vision_config.model_type)
        self.post_init()
        if config.backbone_weights == "reference":
            # The encoder weights live in `backbone_id`, not in this folder: neither saved nor expected on load.
            self._keys_to_ignore_on_save.update(f"vision_model.{key}" for key in self.vision_model.state_dict())
            self._keys_to_ignore_on_load_missing.add(r"^vision_model\.")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only the two heads are ours; the nested encoder initialises itself. Both heads are
        # overwritten by trained weights on export and on load.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.02)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``PreTrainedModel.from_pretrained``; a ``reference`` bundle then loads its encoder from ``backbone_id``."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if model.config.backbone_weights == "reference":
            model.load_referenced_encoder()
        return loaded

    def load_referenced_encoder(self) -> None:
        """Copy the weights of ``config.backbone_id`` into the encoder (outside ``__init__``: no meta tensors)."""
        pretrained = load_encoder(self.config.vision_config, self.config.backbone_id, dtype=self.dtype)
        self.vision_model.load_state_dict(pretrained.state_dict())

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """phi_e(x): [B, feature_dim] features of preprocessed (resized, normalised) images."""
        return encoder_features(self.vision_model(pixel_values=pixel_values), self.feature_output)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        features = self.get_image_features(pixel_values)
        logits = self.classifier(self.projector(features.to(self.projector.weight.dtype)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


# High-bit-depth greyscale modes, which PIL's convert("RGB") (the stock pipeline's loader) clips at 255.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def eight_bit_image(image):
    """A 16-bit, 32-bit integer or float greyscale image scaled to 8 bits ("L") as Stage I scales it
    (``sfm_hf.data``): 16-bit modes span 0..65535; for "I" and "F" the range is read off the values (floats in
    [0, 1] times 255, values up to 255 kept, larger ones taken as 16-bit). Anything else is returned as it is; a
    path is opened here, since the pipeline's own loader converts (and clips) on opening.
    """
    if isinstance(image, str):
        try:
            image = image_utils.PIL.Image.open(image)
        except (OSError, ValueError):  # a URL or base64 text: the pipeline's loader reads it
            return image
    if getattr(image, "mode", None) not in WIDE_MODES:
        return image
    # PIL is reached through transformers (its vision extra), so that this file imports only torch and transformers.
    values = torch.frombuffer(bytearray(image.convert("F").tobytes()), dtype=torch.float32).double()
    top = float(values.max()) if values.numel() else 0.0
    if image.mode.startswith("I;16") or top > 255:
        values = values / 257.0
    elif image.mode == "F" and top <= 1.0:
        values = values * 255.0
    pixels = values.round().clamp(0, 255).to(torch.uint8)
    return image_utils.PIL.Image.frombytes("L", image.size, bytes(pixels.numpy()))


class SFMImageClassificationPipeline(ImageClassificationPipeline):
    """``pipeline("image-classification")`` of the bundle: the stock one, except that high-bit-depth images are
    scaled to 8 bits like Stage I's real images (the stock loader clips a 16-bit PNG to black and white)."""

    def preprocess(self, image, timeout=None):
        return super().preprocess(eight_bit_image(image), timeout=timeout)


# What the bundle's config.json declares so that pipeline("image-classification", trust_remote_code=True) builds
# SFMImageClassificationPipeline from this file.
CUSTOM_PIPELINES = {
    "image-classification": {
        "impl": "modeling_sfm.SFMImageClassificationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "type": "image",
    }
}


__all__ = ["SFMForImageClassification", "SFMImageClassificationPipeline"]
