"""sfm-hf: Statistical Flow Matching dataset distillation for frozen vision backbones, Hugging Face native.

``import sfm_hf`` is cheap (no torch, no transformers): the command line answers ``--help`` at once.
The exported classifier bundle is registered with the transformers Auto classes the moment those
are imported (or when ``SFMConfig`` / ``SFMForImageClassification`` are first read from this
package), so ``import sfm_hf`` followed by
``AutoModelForImageClassification.from_pretrained(<exported model/>)`` works without
``trust_remote_code`` wherever sfm_hf is installed (and with it, through the bundled remote code,
wherever it is not).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["SFMConfig", "SFMForImageClassification", "register_auto_classes"]

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
_CONFIG_MODULE = "sfm_hf.configuration_sfm"
_MODEL_MODULE = "sfm_hf.modeling_sfm"


def _initialising(module_name: str, class_name: str) -> bool:
    """True while ``module_name`` is half-executed (it imports transformers, whose hook lands here)."""
    module = sys.modules.get(module_name)
    return module is not None and not hasattr(module, class_name)


def _register_config() -> None:
    if _initialising(_CONFIG_MODULE, "SFMConfig"):
        return  # its own post-import hook registers it once it is complete
    from transformers import AutoConfig

    from .configuration_sfm import SFMConfig

    AutoConfig.register(SFMConfig.model_type, SFMConfig, exist_ok=True)


def _register_model() -> None:
    if _initialising(_CONFIG_MODULE, "SFMConfig") or _initialising(_MODEL_MODULE, "SFMForImageClassification"):
        return
    from transformers import AutoModelForImageClassification

    from .configuration_sfm import SFMConfig
    from .modeling_sfm import SFMForImageClassification

    _register_config()
    AutoModelForImageClassification.register(SFMConfig, SFMForImageClassification, exist_ok=True)


def register_auto_classes() -> None:
    """Register SFMConfig / SFMForImageClassification with AutoConfig / AutoModelForImageClassification now."""
    _register_model()


# Whichever of these is imported last completes the registration.
_HOOKS = {
    _CONFIG_AUTO: _register_config, _MODEL_AUTO: _register_model,
    _CONFIG_MODULE: _register_config, _MODEL_MODULE: _register_model,
}


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs the registration right after transformers' Auto modules execute, and costs nothing before.

    Registering eagerly would import torch and transformers (seconds) on every ``import sfm_hf``;
    registering only when a user touches the Auto classes keeps the promise of the bundle at no cost.
    """

    def find_spec(self, name, path=None, target=None):
        if name not in _HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loaders = getattr(self, "_loaders", {})
        self._loaders[name] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders[module.__name__].exec_module(module)
        _HOOKS[module.__name__]()


def _install_hooks() -> None:
    if _MODEL_AUTO in sys.modules:
        _register_model()
    elif _CONFIG_AUTO in sys.modules:
        _register_config()
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str):
    if name == "SFMConfig":
        _register_config()
        from .configuration_sfm import SFMConfig

        return SFMConfig
    if name == "SFMForImageClassification":
        _register_model()
        from .modeling_sfm import SFMForImageClassification

        return SFMForImageClassification
    raise AttributeError(f"module 'sfm_hf' has no attribute {name!r}")


_install_hooks()
