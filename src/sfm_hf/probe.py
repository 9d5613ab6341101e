"""Linear heads trained on fixed features: the golden classifier and the full-dataset references.

Two recipes:
- :func:`fit_logistic_regression` (default, ``golden.recipe: converged``): multinomial logistic
  regression fitted to convergence by full-batch L-BFGS, its L2 strength chosen on a held-out
  slice of the train features and the model then refitted on all of them (the CLIP linear-probe
  protocol). Whatever the dataset size, the result is the optimum, not a point on the way to it.
- :func:`train_linear_head` (``golden.recipe: authors``): the authors' mini-batch Adam recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .config import GoldenOptions

# Rows per forward/backward chunk: the full-batch loss of 1.28M x 768 features never needs more
# than one chunk's float32 copy and logits at a time.
CHUNK_ROWS = 65536


def uniform_linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """A linear layer with uniform(+-1/sqrt(in)) weights drawn from ``generator`` and a zero bias: a seed fixes the start."""
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(in_features)
        layer.weight.copy_(torch.empty(out_features, in_features).uniform_(-bound, bound, generator=generator))
        layer.bias.zero_()
    return layer


def train_linear_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    init_std: float | None = None,
) -> nn.Linear:
    """Adam + cosine schedule stepped per epoch on (features, labels); deterministic for a seed and row order.

    ``init_std``: weights N(0, init_std^2) (the authors: 0.01); None: uniform(+-1/sqrt(D)).
    """
    generator = torch.Generator().manual_seed(seed)
    features = features.to(device, torch.float32)
    labels = labels.to(device)
    if init_std is None:
        head = uniform_linear(features.shape[1], num_classes, generator)
    else:
        head = nn.Linear(features.shape[1], num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * init_std)
            head.bias.zero_()
    head = head.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        for start in range(0, len(features), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return head.cpu().eval()


@dataclass
class LogisticFit:
    """A converged fit and how it was chosen."""

    head: nn.Linear
    l2: float
    validation_accuracy: float | None
    validation_images: int
    sweep: list[dict[str, float]] = field(default_factory=list)
    lbfgs_iterations: int = 0
    gradient_norm: float = 0.0

    def describe(self) -> dict:
        return {
            "recipe": "converged",
            "method": "multinomial logistic regression, full-batch L-BFGS (strong Wolfe line search)",
            "l2": self.l2,
            "validation_accuracy": self.validation_accuracy,
            "validation_images": self.validation_images,
            "l2_sweep": self.sweep,
            "lbfgs_iterations": self.lbfgs_iterations,
            "steps": self.lbfgs_iterations,
            "final_gradient_norm": self.gradient_norm,
        }


def _lbfgs(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    start: nn.Linear | None,
    max_iterations: int,
    device: torch.device | str,
) -> tuple[nn.Linear, int, float]:
    """Minimise mean CE + l2/2 ||W||^2 (bias free) over all rows; returns (head, iterations, gradient norm)."""
    head = nn.Linear(features.shape[1], num_classes).to(device)
    with torch.no_grad():
        if start is None:
            head.weight.zero_()
            head.bias.zero_()
        else:
            head.load_state_dict(start.state_dict())
    rows = len(labels)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=max_iterations, history_size=20, tolerance_grad=1e-6,
        tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device, dtype=torch.float64)
        for begin in range(0, rows, CHUNK_ROWS):
            chunk = features[begin : begin + CHUNK_ROWS].to(device, torch.float32)
            target = labels[begin : begin + CHUNK_ROWS].to(device)
            loss = F.cross_entropy(head(chunk), target, reduction="sum") / rows
            loss.backward()
            total += loss.detach().double()
        penalty = 0.5 * l2 * head.weight.pow(2).sum()
        penalty.backward()
        return (total + penalty.detach().double()).float()

    optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    closure()
    gradient_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in head.parameters()))
    return head.requires_grad_(False), int(iterations), gradient_norm


def _validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (fit, validation): ``fraction`` of every class held out (at least one row, if the class has two)."""
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for label in torch.unique(labels).tolist():
        positions = torch.nonzero(labels == label).flatten()
        positions = positions[torch.randperm(len(positions), generator=generator)]
        count = min(len(positions) - 1, max(1, round(fraction * len(positions))))
        held.append(positions[:count])
        fit.append(positions[count:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2_grid: list[float],
    validation_fraction: float = 0.1,
    max_iterations: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LogisticFit:
    """L2 strength chosen on a held-out slice of (features, labels), then the fit on all rows with it.

    Deterministic: zero start, full batch, the slice drawn from ``seed``. The sweep runs from the
    strongest L2 down, each fit warm-started from the previous one (same optimum, fewer steps);
    ties in validation accuracy go to the stronger L2.
    """
    labels = labels.long()
    grid = sorted(set(l2_grid), reverse=True)
    chosen, best_accuracy, sweep = grid[0], None, []
    fit_positions, held_positions = _validation_split(labels, validation_fraction, seed)
    if len(grid) > 1 and len(held_positions):
        fit_features, fit_labels = features[fit_positions], labels[fit_positions]
        held_features = features[held_positions].to(device)
        held_labels = labels[held_positions].to(device)
        previous = None
        for l2 in grid:
            previous, _, _ = _lbfgs(fit_features, fit_labels, num_classes, l2, start=previous,
                                    max_iterations=max_iterations, device=device)
            score = accuracy(previous, held_features, held_labels)
            sweep.append({"l2": l2, "validation_accuracy": score})
            if best_accuracy is None or score > best_accuracy:
                chosen, best_accuracy = l2, score
    head, iterations, gradient_norm = _lbfgs(features, labels, num_classes, chosen, start=None,
                                             max_iterations=max_iterations, device=device)
    return LogisticFit(head.cpu().eval(), chosen, best_accuracy, len(held_positions) if sweep else 0, sweep,
                       iterations, gradient_norm)


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    correct = 0
    for begin in range(0, len(labels), CHUNK_ROWS):
        chunk = features[begin : begin + CHUNK_ROWS].float()
        correct += int((head(chunk).argmax(dim=-1) == labels[begin : begin + CHUNK_ROWS]).sum())
    return correct / len(labels)


def fit_reference_probe(
    options: "GoldenOptions",
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[nn.Linear, dict]:
    """The golden classifier / a full-dataset probe by ``options.recipe``; returns (head, how it was fitted)."""
    if options.recipe == "authors":
        head = train_linear_head(
            features, labels, num_classes, epochs=options.epochs, lr=options.lr, batch_size=options.batch_size,
            weight_decay=options.weight_decay, seed=seed, device=device, init_std=0.01,
        )
        steps = options.epochs * math.ceil(len(labels) / options.batch_size)
        summary = f"authors' recipe: {options.epochs} epochs of Adam (lr {options.lr:g}, batch {options.batch_size})"
        return head, {"recipe": "authors", "summary": summary, "epochs": options.epochs, "lr": options.lr,
                      "batch_size": options.batch_size, "weight_decay": options.weight_decay, "steps": steps,
                      "seed": seed}
    fit = fit_logistic_regression(
        features, labels, num_classes, l2_grid=list(options.l2_grid),
        validation_fraction=options.validation_fraction, max_iterations=options.max_iterations, seed=seed,
        device=device,
    )
    summary = f"logistic regression fitted to convergence (L-BFGS), L2 {fit.l2:g}"
    if fit.validation_accuracy is not None:
        summary += (f" chosen on {fit.validation_images} held-out train images "
                    f"({fit.validation_accuracy:.1%} there)")
    return fit.head, {**fit.describe(), "summary": summary, "seed": seed}
