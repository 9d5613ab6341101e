"""Saved projector files (save, load with shape checks, re-score) and the golden classifier they feed."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..backbones import load_backbone
from ..config import Config
from .. import hub
from ..probe import accuracy
from ..utils import load_tensors, save_tensors_atomically
from ..statistics import Statistics, load_golden_classifier
from .errors import EvaluationError, ProjectorMismatchError
from .features import split_features


def save_projector(projector: nn.Linear, path: Path, *, eval_backbone: str, distill_backbone: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomically(
        {"weight": projector.weight.detach().cpu().contiguous(), "bias": projector.bias.detach().cpu().contiguous()},
        path,
        metadata={"eval_backbone": eval_backbone, "distill_backbone": distill_backbone},
    )


def load_projector(path: str | Path, *, eval_dim: int, distill_dim: int) -> nn.Linear:
    """A saved projector P: D_e -> D_d (``weight`` [D_d, D_e], ``bias`` [D_d]), checked against both dimensions."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"No projector at {path}.")
    tensors = load_tensors(path, "a projector", "run the 'evaluate' stage again", keys=("weight", "bias"),
                           error_type=EvaluationError)
    weight, bias = tensors["weight"], tensors["bias"]
    source = f"trained for {load_projector_metadata(path).get('eval_backbone', 'an unknown eval backbone')}"
    if weight.shape[1] != eval_dim:
        raise ProjectorMismatchError(
            f"Projector {path} takes {weight.shape[1]}-d features ({source}), but the eval backbone gives "
            f"{eval_dim}-d features: use the projector of this eval backbone."
        )
    if weight.shape[0] != distill_dim or bias.shape != (distill_dim,):
        raise ProjectorMismatchError(
            f"Projector {path} outputs {weight.shape[0]}-d features, but the golden classifier takes {distill_dim}-d "
            "ones: it belongs to another distillation backbone."
        )
    projector = nn.Linear(eval_dim, distill_dim)
    projector.load_state_dict(tensors)
    return projector.eval()


def load_projector_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def score_projector(config: Config, accelerator, projector_path: str | Path, eval_backbone: str) -> float:
    """Accuracy of golden(P(phi_e(x))) on the eval split for a given projector; call it on every process."""
    statistics_dir = hub.statistics_dir(config)
    statistics = Statistics.load(statistics_dir)
    golden = load_golden(statistics_dir, statistics)
    backbone = load_backbone(eval_backbone, device=accelerator.device, normalization=config.data.normalization)
    projector = load_projector(projector_path, eval_dim=backbone.feature_dim, distill_dim=golden.in_features)
    evaluation = split_features(config, accelerator, backbone, config.eval_split, "eval", statistics.class_names)
    return accuracy(nn.Sequential(projector, golden), evaluation.features, evaluation.labels)


def load_golden(statistics_dir: Path, statistics: Statistics) -> nn.Linear:
    golden = load_golden_classifier(statistics_dir)
    if golden.in_features != statistics.feature_dim or golden.out_features != statistics.num_classes:
        raise EvaluationError(
            f"The golden classifier in {statistics_dir} is {golden.out_features}x{golden.in_features} but the "
            f"statistics are {statistics.num_classes} classes x {statistics.feature_dim}-d: re-run 'statistics'."
        )
    return golden.requires_grad_(False)
