"""Configuration of the SFM classifier bundle: frozen encoder phi_e -> projector P -> golden classifier f.

This file travels to the Hub as remote code beside the weights, so it imports only
``transformers`` (and nothing from ``sfm_hf``).
"""

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class SFMConfig(PreTrainedConfig):
    r"""
    vision_config (`dict` or `PreTrainedConfig`):
        Configuration of the evaluation encoder phi_e (a DINOv2, CLIP vision, ViT/DeiT, SigLIP vision or timm
        wrapper model). Named ``vision_config`` rather than ``backbone_config``, which transformers reserves for
        its AutoBackbone feature-map path.
    feature_dim (`int`):
        Width D_e of the encoder feature phi_e(x), the projector's input.
    distill_feature_dim (`int`):
        Width D_d of the distillation backbone's feature, on which the golden classifier was trained; the
        projector's output.
    backbone_weights (`"embedded"` or `"reference"`):
        ``embedded``: the encoder weights are saved in this folder, which is then self-contained.
        ``reference``: only the projector and golden classifier are saved; the encoder weights are loaded from
        ``backbone_id`` when the bundle is loaded with ``from_pretrained``.
    backbone_id (`str`, *optional*):
        Hub id (or folder) of the evaluation encoder's checkpoint; required with ``backbone_weights="reference"``.
    distill_backbone (`str`, *optional*):
        Hub id of the distillation backbone phi_d whose features the golden classifier reads (documentation only).
    """

    model_type = "sfm"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2")}

    vision_config: dict | PreTrainedConfig | None = None
    feature_dim: int = 768
    distill_feature_dim: int = 768
    backbone_weights: Literal["embedded", "reference"] = "embedded"
    backbone_id: str | None = None
    distill_backbone: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.backbone_weights == "reference" and not self.backbone_id:
            raise ValueError("SFMConfig(backbone_weights='reference') needs the encoder's `backbone_id`.")


__all__ = ["SFMConfig"]
