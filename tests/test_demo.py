"""The demo's committed pre-trained backbone: what its regeneration wrote, for today's recipe, and what the demo and
the tests run on."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfm_hf import demo
from sfm_hf.utils import file_digest


def test_the_committed_demo_backbone_is_what_its_regeneration_wrote():
    """Fails when the weights, a file or the pre-training recipe changed without `make demo-backbone`."""
    assert demo.demo_backbone_problems() == []


def test_the_committed_demo_backbone_was_pre_trained_on_the_pinned_kernels():
    made_with = json.loads((demo.DEMO_BACKBONE / demo.MANIFEST).read_text())["made_with"]
    assert made_with["kernels"] == demo.PINNED_KERNELS
    assert made_with["cpu_capability"] == "DEFAULT"


@pytest.fixture
def asset_copy(tmp_path):
    return shutil.copytree(demo.DEMO_BACKBONE, tmp_path / "tiny-vit")


def test_changed_weights_or_files_without_regeneration_are_caught(asset_copy):
    assert demo.demo_backbone_problems(asset_copy) == []
    weights = asset_copy / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    (problem,) = demo.demo_backbone_problems(asset_copy)
    assert "model.safetensors changed" in problem and "make demo-backbone" in problem
    weights.write_bytes(original)
    (asset_copy / "stray.bin").write_bytes(b"")
    (asset_copy / "config.json").unlink()
    assert [problem.split(": ")[0] for problem in demo.demo_backbone_problems(asset_copy)] == [
        f"{asset_copy / 'config.json'} is missing", f"{asset_copy / 'stray.bin'} is not in the manifest"]
    (asset_copy / demo.MANIFEST).unlink()
    assert "manifest.json is missing" in demo.demo_backbone_problems(asset_copy)[0]


def test_a_changed_recipe_without_regeneration_is_caught(asset_copy, monkeypatch):
    monkeypatch.setitem(demo.DEMO_BACKBONE_SETTINGS, "pretrain_steps", 499)
    (problem,) = demo.demo_backbone_problems(asset_copy)
    assert "recipe" in problem and "make demo-backbone" in problem
    monkeypatch.undo()

    def pretrain_on_glyphs(model, *, steps=500, seed=0):
        pass

    monkeypatch.setattr(demo, "pretrain_on_glyphs", pretrain_on_glyphs)
    assert "recipe" in demo.demo_backbone_problems(asset_copy)[0]


def test_the_code_fingerprint_ignores_docstrings_comments_and_layout_only():
    plain = "def f(x):\n    return g(x, 1)\n"
    dressed = 'def f(x):\n    """Calls g."""\n    # why\n    return g(x,\n             1)  # one\n'
    changed = "def f(x):\n    return g(x, 2)\n"
    assert demo._code_tokens(plain) == demo._code_tokens(dressed) != demo._code_tokens(changed)


def test_the_demo_runs_on_the_committed_backbone_and_follows_its_regeneration(tmp_path, asset_copy, monkeypatch):
    _, backbone = demo.prepare_demo_assets(tmp_path / "assets")
    assert (backbone / "model.safetensors").read_bytes() == (demo.DEMO_BACKBONE / "model.safetensors").read_bytes()

    # A regeneration: other weights, a new manifest. The demo's copy follows without any version bump.
    weights = load_file(asset_copy / "model.safetensors")
    save_file({name: tensor + 1 for name, tensor in weights.items()}, str(asset_copy / "model.safetensors"))
    manifest = json.loads((asset_copy / demo.MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = file_digest(asset_copy / "model.safetensors")
    (asset_copy / demo.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setattr(demo, "DEMO_BACKBONE", asset_copy)
    _, backbone = demo.prepare_demo_assets(tmp_path / "assets")
    reloaded = load_file(backbone / "model.safetensors")
    assert all(torch.equal(reloaded[name], weights[name] + 1) for name in weights)
