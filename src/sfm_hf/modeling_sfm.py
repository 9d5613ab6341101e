"""The SFM classifier bundle: logits = golden(P(phi_e(x))) (classifier inheritance, Eq. 11 of the paper).

phi_e is a frozen evaluation encoder, P a linear projector trained on the synthetic images to map
phi_e's features into the distillation backbone's feature space, and the golden classifier a
linear head trained on the full real dataset in that space.

This file travels to the Hub as remote code beside the weights, so it imports only torch,
transformers and its sibling ``configuration_sfm``; loading it never needs ``sfm_hf``.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_sfm import SFMConfig

# Which encoder class each checkpoint family loads as, and which of its outputs is the feature.
# This duplicates the per-family rule of sfm_hf/backbones.py on purpose: this file may not import
# sfm_hf. tests/test_modeling.py checks, family by family, that both give the same features.
# Class names, resolved on use: importing every family's modelling code up front costs seconds.
ENCODER_CLASSES = {"clip_vision_model": "CLIPVisionModelWithProjection", "siglip_vision_model": "SiglipVisionModel"}
ENCODER_KWARGS = {"vit": {"add_pooling_layer": False}, "deit": {"add_pooling_layer": False}}
FEATURE_OUTPUTS = {"clip_vision_model": "image_embeds", "vit": "cls_token", "deit": "cls_token"}
DEFAULT_FEATURE_OUTPUT = "pooler_output"


def feature_output(model_type: str) -> str:
    """The encoder output used as phi_e(x): image_embeds (CLIP), the CLS token (ViT/DeiT) or pooler_output."""
    return FEATURE_OUTPUTS.get(model_type, DEFAULT_FEATURE_OUTPUT)


def build_encoder(vision_config) -> nn.Module:
    """A randomly initialised encoder of the checkpoint family described by ``vision_config``."""
    model_type = vision_config.model_type
    kwargs = ENCODER_KWARGS.get(model_type, {})
    if model_type in ENCODER_CLASSES:
        return getattr(transformers, ENCODER_CLASSES[model_type])(vision_config, **kwargs)
    return AutoModel.from_config(vision_config, **kwargs)


def load_encoder(vision_config, checkpoint: str, **kwargs) -> nn.Module:
    """The pretrained encoder of ``checkpoint``, loaded as the same class ``build_encoder`` gives."""
    model_type = vision_config.model_type
    kwargs = {**ENCODER_KWARGS.get(model_type, {}), **kwargs}
    if model_type in ENCODER_CLASSES:
        return getattr(transformers, ENCODER_CLASSES[model_type]).from_pretrained(checkpoint, **kwargs)
    return AutoModel.from_pretrained(checkpoint, **kwargs)


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
        outputs = self.vision_model(pixel_values=pixel_values)
        if self.feature_output == "cls_token":
            return outputs.last_hidden_state[:, 0]
        return getattr(outputs, self.feature_output)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> ImageClassifierOutput:
        features = self.get_image_features(pixel_values)
        logits = self.classifier(self.projector(features.to(self.projector.weight.dtype)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["SFMForImageClassification"]
