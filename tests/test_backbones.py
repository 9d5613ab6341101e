import pytest
import torch

from conftest import FAMILIES, FEATURE_DIMS
from sfm_hf.backbones import BackboneError, load_backbone
from sfm_hf.modeling_sfm import IMAGENET_MEAN, OPENAI_CLIP_MEAN


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_from_local_folder_with_documented_feature(tiny_backbone, family):
    backbone = load_backbone(tiny_backbone(family))
    assert backbone.feature_dim == FEATURE_DIMS[family]
    assert backbone.image_size == 28
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.model.training

    pixels = torch.rand(3, 3, 40, 36, requires_grad=True)
    features = backbone(pixels)
    assert features.shape == (3, FEATURE_DIMS[family])
    features.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_feature_is_the_documented_output(tiny_backbone):
    from transformers import CLIPVisionModelWithProjection, Dinov2Model

    pixels = torch.rand(2, 3, 28, 28)
    dinov2 = load_backbone(tiny_backbone("dinov2"))
    reference = Dinov2Model.from_pretrained(tiny_backbone("dinov2")).eval()
    expected = reference(pixel_values=dinov2.preprocess(pixels)).pooler_output
    torch.testing.assert_close(dinov2(pixels), expected)

    clip = load_backbone(tiny_backbone("clip"))
    reference = CLIPVisionModelWithProjection.from_pretrained(tiny_backbone("clip")).eval()
    torch.testing.assert_close(clip(pixels), reference(pixel_values=clip.preprocess(pixels)).image_embeds)


def test_own_normalisation_statistics(tiny_backbone):
    assert load_backbone(tiny_backbone("clip")).info.mean == pytest.approx(OPENAI_CLIP_MEAN)
    assert load_backbone(tiny_backbone("dinov2")).info.mean == pytest.approx(IMAGENET_MEAN)
    assert load_backbone(tiny_backbone("siglip")).info.mean == pytest.approx((0.5, 0.5, 0.5))
    forced = load_backbone(tiny_backbone("clip"), normalization="imagenet")
    assert forced.info.mean == pytest.approx(IMAGENET_MEAN)


def test_unloadable_backbones_are_clear(tmp_path):
    with pytest.raises(BackboneError, match="no usable config.json"):
        load_backbone(str(tmp_path))
    with pytest.raises(BackboneError, match="neither a local folder nor a reachable Hub model"):
        load_backbone("nobody/not-a-model-xyz")
    with pytest.raises(BackboneError, match="open_clip"):
        load_backbone(f"local-dir:{tmp_path / 'missing'}")


def test_processor_crop_size_wins_over_the_position_embedding_grid(tmp_path):
    """DINOv2 checkpoints say image_size 518 (the grid they interpolate from) but are fed 224 crops."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    backbone = load_backbone(str(tmp_path))
    assert backbone.image_size == 28
    assert backbone(torch.rand(2, 3, 40, 40)).shape == (2, 32)


def test_demo_backbone_weights_do_not_depend_on_the_thread_count(tmp_path):
    """Before pre-training ran on one thread, 20 steps on 2 threads already gave other weights than on 1, and the
    demo (1 thread under its launcher) and the tests (2) used different backbones with different orderings. Both now
    use the committed backbone; its regeneration and the benchmarks' second backbone still pre-train here."""
    from safetensors.torch import load_file

    from sfm_hf.demo import build_tiny_vit

    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            folder = build_tiny_vit(tmp_path / f"threads-{count}", pretrain_steps=20)
            weights.append(load_file(folder / "model.safetensors"))
            assert torch.get_num_threads() == count  # the caller's thread count comes back
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
