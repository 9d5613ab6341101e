"""Closed-form linear projector P: x -> W x + b by ridge regression towards a prior map (pure tensor math).

Minimises ``sum_i ||W x_i + b - y_i||^2 / n + lam * ||W - W0||_F^2`` with the bias unpenalised,
so ``lam -> 0`` is ordinary least squares and ``lam -> inf`` gives ``W = W0`` (with ``b`` the
difference of the means). The data enter only through sufficient statistics (sums and Gram
matrices per group), so features are never all held at once, and held-out groups for choosing
``lam`` cost one eigendecomposition per fold for the whole grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RidgeMoments:
    """Per-group sufficient statistics of pairs (x [D_x], y [D_y]), accumulated in float64."""

    count: torch.Tensor  # [G]
    sum_x: torch.Tensor  # [G, D_x]
    sum_y: torch.Tensor  # [G, D_y]
    xx: torch.Tensor  # [G, D_x, D_x]
    xy: torch.Tensor  # [G, D_x, D_y]
    yy: torch.Tensor  # [G]  sum of ||y||^2

    @classmethod
    def zeros(cls, groups: int, x_dim: int, y_dim: int) -> "RidgeMoments":
        f64 = torch.float64
        return cls(torch.zeros(groups, dtype=f64), torch.zeros(groups, x_dim, dtype=f64),
                   torch.zeros(groups, y_dim, dtype=f64), torch.zeros(groups, x_dim, x_dim, dtype=f64),
                   torch.zeros(groups, x_dim, y_dim, dtype=f64), torch.zeros(groups, dtype=f64))

    def add(self, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, weight: float = 1.0) -> None:
        """Add rows ``x`` [N, D_x], ``y`` [N, D_y] belonging to ``groups`` [N] (ints in [0, G)), each counting as
        ``weight`` rows (as if repeated ``weight`` times)."""
        x, y, groups = x.detach().double().cpu(), y.detach().double().cpu(), groups.cpu()
        for group in groups.unique().tolist():
            rows = groups == group
            xg, yg = x[rows], y[rows]
            self.count[group] += weight * len(xg)
            self.sum_x[group] += weight * xg.sum(0)
            self.sum_y[group] += weight * yg.sum(0)
            self.xx[group] += weight * (xg.T @ xg)
            self.xy[group] += weight * (xg.T @ yg)
            self.yy[group] += weight * (yg * yg).sum()

    def select(self, chosen: torch.Tensor) -> "RidgeMoments":
        """Moments of the groups where ``chosen`` [G] is true, summed into one group."""
        return RidgeMoments(*(getattr(self, name)[chosen].sum(0, keepdim=True)
                              for name in ("count", "sum_x", "sum_y", "xx", "xy", "yy")))


def _centred(moments: RidgeMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, mean_x, mean_y, covariance x, cross-covariance x-y) of all groups together, per row."""
    n = moments.count.sum()
    if n < 1:
        raise ValueError("ridge regression needs at least one row")
    mean_x, mean_y = moments.sum_x.sum(0) / n, moments.sum_y.sum(0) / n
    cov_xx = moments.xx.sum(0) / n - torch.outer(mean_x, mean_x)
    cov_xy = moments.xy.sum(0) / n - torch.outer(mean_x, mean_y)
    return n, mean_x, mean_y, cov_xx, cov_xy


def prior_map(x_dim: int, y_dim: int) -> torch.Tensor:
    """W0 [D_y, D_x]: the identity when the dimensions match (same-size features), zero otherwise."""
    return torch.eye(y_dim, x_dim, dtype=torch.float64) if x_dim == y_dim else torch.zeros(y_dim, x_dim, dtype=torch.float64)


def ridge_solutions(moments: RidgeMoments, lambdas: list[float], prior: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W [D_y, D_x], b [D_y]) for every ``lam``: W^T = (C_xx + lam I)^-1 (C_xy + lam W0^T), b = mean_y - W mean_x."""
    _, mean_x, mean_y, cov_xx, cov_xy = _centred(moments)
    eigenvalues, vectors = torch.linalg.eigh(cov_xx)
    eigenvalues = eigenvalues.clamp_min(0)
    prior_t = prior.T.to(cov_xy)
    solutions = []
    for lam in lambdas:
        if lam < 0:
            raise ValueError(f"ridge lambda must be >= 0, got {lam}")
        rotated = vectors.T @ (cov_xy + lam * prior_t)
        inverse = torch.where(eigenvalues + lam > 0, 1.0 / (eigenvalues + lam), torch.zeros_like(eigenvalues))
        weight = (vectors @ (inverse.unsqueeze(1) * rotated)).T
        solutions.append((weight, mean_y - weight @ mean_x))
    return solutions


def squared_error(moments: RidgeMoments, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Mean over rows of ||W x + b - y||^2, from the moments alone."""
    n = moments.count.sum()
    sum_x, sum_y = moments.sum_x.sum(0), moments.sum_y.sum(0)
    xx, xy, yy = moments.xx.sum(0), moments.xy.sum(0), moments.yy.sum()
    total = (
        (weight @ xx * weight).sum() + 2 * bias @ (weight @ sum_x) + n * bias @ bias
        - 2 * (weight.T * xy).sum() - 2 * bias @ sum_y + yy
    )
    return float(total / n)


def choose_lambda(moments: RidgeMoments, lambdas: list[float], prior: torch.Tensor) -> tuple[float, list[float]]:
    """The ``lam`` of the grid with the least held-out error when each group is held out in turn.

    Returns (chosen lambda, mean held-out error per lambda).
    """
    groups = moments.count.shape[0]
    if groups < 2:
        raise ValueError("choosing lambda needs at least two groups to hold out")
    errors = torch.zeros(len(lambdas), dtype=torch.float64)
    for held_out in range(groups):
        chosen = torch.arange(groups) != held_out
        fits = ridge_solutions(moments.select(chosen), lambdas, prior)
        validation = moments.select(~chosen)
        errors += torch.tensor([squared_error(validation, weight, bias) for weight, bias in fits])
    errors /= groups
    return lambdas[int(torch.argmin(errors))], errors.tolist()


def lambda_grid(moments: RidgeMoments, ratios: list[float]) -> list[float]:
    """``ratios`` times the mean variance of x per dimension, so one grid suits features of any scale."""
    _, _, _, cov_xx, _ = _centred(moments)
    scale = float(torch.diagonal(cov_xx).mean().clamp_min(1e-12))
    return [ratio * scale for ratio in ratios]


def fit_ridge(moments: RidgeMoments, lam: float, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) fitted on all groups with one ``lam``."""
    return ridge_solutions(moments, [lam], prior)[0]
