"""The classifier bundle's own code: feature parity with backbones.py, save/load, remote-code hygiene."""

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfm_hf.backbones import load_backbone
from sfm_hf.configuration_sfm import SFMConfig
from sfm_hf.modeling_sfm import SFMForImageClassification

REMOTE_FILES = ("configuration_sfm.py", "modeling_sfm.py")
TRANSFORMERS_FAMILIES = ("dinov2", "vit", "clip", "siglip", "timm_eva02")


def bundle_for(name: str, *, num_classes: int = 3, distill_dim: int = 5, backbone_weights: str = "embedded",
               seed: int = 0) -> tuple[SFMForImageClassification, object]:
    """A bundle around the backbone ``name`` with random heads; returns (bundle, FrozenBackbone)."""
    backbone = load_backbone(name)
    config = SFMConfig(
        vision_config=backbone.model.config, feature_dim=backbone.feature_dim, distill_feature_dim=distill_dim,
        id2label={k: f"class-{k}" for k in range(num_classes)}, backbone_weights=backbone_weights, backbone_id=name,
    )
    model = SFMForImageClassification(config).eval()
    model.vision_model.load_state_dict(backbone.model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model.projector, model.classifier):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator))
    return model, backbone


@pytest.mark.parametrize("family", TRANSFORMERS_FAMILIES)
def test_features_match_backbones_py(tiny_backbone, family):
    """backbones.py and the bundle read the same family table; both must give the same phi_e(x)."""
    model, backbone = bundle_for(tiny_backbone(family))
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(images)
        features = model.get_image_features(backbone.preprocess(images))
        logits = model(backbone.preprocess(images)).logits
    assert features.shape == expected.shape
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.classifier(model.projector(expected)), rtol=1e-5, atol=1e-5)


def test_save_and_auto_load(tiny_backbone, tmp_path):
    from transformers import AutoConfig, AutoModelForImageClassification

    model, backbone = bundle_for(tiny_backbone("clip"))
    SFMConfig.register_for_auto_class()
    SFMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_sfm.SFMConfig",
        "AutoModelForImageClassification": "modeling_sfm.SFMForImageClassification",
    }
    assert "vision_config" in saved and "backbone_config" not in saved
    assert saved["vision_config"]["model_type"] == "clip_vision_model"
    assert all((tmp_path / name).is_file() for name in REMOTE_FILES)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SFMConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is SFMForImageClassification  # registered by `import sfm_hf`
    pixels = backbone.preprocess(torch.rand(2, 3, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    assert loaded.config.id2label[2] == "class-2"


def test_reference_bundle_saves_no_encoder_and_loads_it_from_backbone_id(tiny_backbone, tmp_path):
    name = tiny_backbone("vit")
    model, backbone = bundle_for(name, backbone_weights="reference")
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert keys == {"projector.weight", "projector.bias", "classifier.weight", "classifier.bias"}
    loaded = SFMForImageClassification.from_pretrained(tmp_path).eval()
    pixels = backbone.preprocess(torch.rand(2, 3, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)


def test_reference_config_needs_a_backbone_id():
    with pytest.raises(ValueError, match="backbone_id"):
        SFMConfig(backbone_weights="reference")


@pytest.mark.parametrize("filename", REMOTE_FILES)
def test_remote_code_imports_only_torch_transformers_and_siblings(filename):
    """These files run on the Hub without sfm_hf: any other import would break trust_remote_code loading."""
    source = Path(__file__).parents[1] / "src" / "sfm_hf" / filename
    imported = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append((node.module or "", node.level))
    assert imported
    for module, level in imported:
        if level:
            assert level == 1 and module in ("configuration_sfm", "modeling_sfm"), module
        else:
            assert module.split(".")[0] in ("torch", "transformers", "typing"), module
