"""sfm-hf: Statistical Flow Matching dataset distillation for frozen vision backbones, Hugging Face native.

Importing the package registers the exported classifier bundle with the transformers Auto classes,
so ``AutoModelForImageClassification.from_pretrained(<exported model/>)`` works without
``trust_remote_code`` wherever sfm_hf is installed (and with it, through the bundled remote code,
wherever it is not).
"""

from transformers import AutoConfig, AutoModelForImageClassification

from .configuration_sfm import SFMConfig
from .modeling_sfm import SFMForImageClassification

AutoConfig.register(SFMConfig.model_type, SFMConfig, exist_ok=True)
AutoModelForImageClassification.register(SFMConfig, SFMForImageClassification, exist_ok=True)

__all__ = ["SFMConfig", "SFMForImageClassification"]
