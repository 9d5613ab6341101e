"""Distillation objectives as pure functions of tensors (features, labels, statistics).

Equation numbers refer to the SFM paper (shared/seeds/sfm_paper.md, section 3).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

NonTargetMode = Literal["class_mean", "sample"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32: bf16/fp16 features would make cosines of C x D sums too coarse, float64 stays float64."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def non_target_centres(class_means: torch.Tensor, class_counts: torch.Tensor,
                       mode: NonTargetMode = "class_mean") -> torch.Tensor:
    """Non-target centre nu_c of every class (the flow's end point in Eq. 7/8), [C, D] float64.

    ``class_mean`` (the authors' code, default): (sum_k mu_k - mu_c) / (C - 1).
    ``sample`` (the paper's Eq. 7 derivation): the mean over all real samples outside c,
    (sum_k n_k mu_k - n_c mu_c) / (N - n_c). Both agree when classes are balanced.
    """
    # float64: the sums over C means cancel against mu_c, which float32 resolves poorly for large C.
    means = class_means.double()
    num_classes = means.shape[0]
    if num_classes < 2:
        raise ValueError("a flow needs at least two classes")
    if mode == "class_mean":
        return (means.sum(0, keepdim=True) - means) / (num_classes - 1)
    if mode == "sample":
        counts = class_counts.to(device=means.device, dtype=torch.float64).unsqueeze(1)
        weighted = means * counts
        return (weighted.sum(0, keepdim=True) - weighted) / (counts.sum() - counts)
    raise ValueError(f"unknown non-target mode {mode!r}; expected 'class_mean' or 'sample'")


def statistical_flow(class_means: torch.Tensor, class_counts: torch.Tensor,
                     mode: NonTargetMode = "class_mean") -> torch.Tensor:
    """The statistical flow F*_c = nu_c - mu_c (Eq. 8), [C, D] float32, computed in float64."""
    return (non_target_centres(class_means, class_counts, mode) - class_means.double()).float()


def class_centres(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of ``features`` [N, D] -> [C, D] (the target centres of Eq. 7), differentiable w.r.t. them.

    Raises ValueError naming the classes without a sample: their centre, and so the whole flow, is undefined.
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten().tolist()
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        raise ValueError(f"classes without any sample: {shown}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)
    return sums / counts.unsqueeze(1).to(features.dtype)


def flow_cosine(flow_a: torch.Tensor, flow_b: torch.Tensor) -> torch.Tensor:
    """cos(vec a, vec b) as used in Eq. 9: ONE cosine over the flattened tensors, not a mean of per-class cosines.

    A single cosine weights each class by its flow's norm and is invariant only to a global positive scale.
    """
    dtype = _compute_dtype(flow_a, flow_b)
    return F.cosine_similarity(flow_a.flatten().to(dtype), flow_b.flatten().to(dtype), dim=0)


def sfm_loss(features: torch.Tensor, labels: torch.Tensor, target_means: torch.Tensor,
             target_flow: torch.Tensor) -> torch.Tensor:
    """Statistical flow matching, L = 1 - cos(vec F*, vec F^s) (Eq. 9).

    ``features`` [N, D] are synthetic features already averaged over augmentation rounds per
    image; ``target_means`` [C, D] are the real class means mu*, ``target_flow`` [C, D] is F*
    (Eq. 8). The synthetic non-target centre is the mean of the other synthetic *class*
    centres, (sum_k m_k - m_c) / (C - 1), which is right for any ipc; the authors' code
    divides a sum over images by N - 1, which equals it only for ipc = 1.
    """
    num_classes = target_flow.shape[0]
    if num_classes < 2:
        raise ValueError("a flow needs at least two classes")
    centres = class_centres(features.to(_compute_dtype(features)), labels, num_classes)
    return centre_flow_loss(centres, target_means, target_flow)


def _synthetic_non_target(centres: torch.Tensor) -> torch.Tensor:
    return (centres.sum(0, keepdim=True) - centres) / (centres.shape[0] - 1)


def centre_flow_loss(centres: torch.Tensor, target_means: torch.Tensor, target_flow: torch.Tensor) -> torch.Tensor:
    """:func:`sfm_loss` from the synthetic class centres [C, D] themselves.

    No label checks, so no host-device synchronisation: the form for a training loop that
    already holds one centre per class.
    """
    centres = centres.to(_compute_dtype(centres))
    return 1 - flow_cosine(target_flow, _synthetic_non_target(centres) - centres)


def mean_spread_loss(centres: torch.Tensor, target_means: torch.Tensor) -> torch.Tensor:
    """Where the synthetic class centres sit and how far apart they are: what :func:`centre_flow_loss` cannot see.

    With the class-mean non-target centres, F^s_c = nu^s_c - m_c = -C/(C-1) (m_c - mean(m)) and F*_c likewise, so
    Eq. 9 is 1 - cos(m - mean(m), mu* - mean(mu*)) over the flattened centred centres: m -> s m + b (any s > 0,
    b in R^D) leaves it unchanged. This term measures exactly those two degrees of freedom against the real
    class means mu*, relative to their spread S = ||mu* - mean(mu*)||_F^2:

        C ||mean(m) - mean(mu*)||^2 / S  +  (||m - mean(m)||_F / sqrt(S) - 1)^2

    (the overall mean's offset, in units of the class spread, and the spread's ratio); the direction of the
    centred centres stays the cosine's alone. Zero for m = mu* and for any m = mu* + (a pattern with zero
    overall mean whose spread keeps S).
    """
    dtype = _compute_dtype(centres, target_means)
    centres, target_means = centres.to(dtype), target_means.to(dtype)
    target_mean, mean = target_means.mean(0), centres.mean(0)
    spread = (target_means - target_mean).square().sum()
    offset = centres.shape[0] * (mean - target_mean).square().sum() / spread
    ratio = ((centres - mean).square().sum() / spread).sqrt()
    return offset + (ratio - 1).square()


def decoupled_centre_loss(centres: torch.Tensor, target_means: torch.Tensor, target_flow: torch.Tensor,
                          alpha: float) -> torch.Tensor:
    """The Tab. 3 ablations as the authors implement them: alpha MSE(mu*, m) + (1 - alpha) MSE(nu*, nu^s).

    m are the synthetic class centres [C, D], nu^s their non-target centres, nu* = F* + mu* the
    real ones. TCDD is alpha = 1 (target centres only), NCDD alpha = 0 (non-target only). Unlike
    SFM's cosine it matches magnitudes, not only directions. MSE is the mean over all C x D entries.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    dtype = _compute_dtype(centres, target_means)
    centres, target_means = centres.to(dtype), target_means.to(dtype)
    loss = centres.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * F.mse_loss(centres, target_means)
    if alpha < 1:
        target_non_target = target_flow.to(dtype) + target_means
        loss = loss + (1 - alpha) * F.mse_loss(_synthetic_non_target(centres), target_non_target)
    return loss


def linear_head_gradient(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                         analytic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the mean cross-entropy of a linear head w.r.t. (W [C, D], b [C]), in closed form (Eq. 1).

    dW = (p - y)^T phi / B and db = sum_i (p_i - y_i) / B with p = softmax(W phi + b), or
    p = 1/C everywhere when ``analytic`` (Eq. 4). Being an explicit expression of the features,
    it is differentiable w.r.t. them by ordinary backward; the authors' code instead builds the
    gradient with autograd.grad(create_graph=True) and pays for a double backward.
    """
    dtype = _compute_dtype(features)
    features = features.to(dtype)
    num_classes = weight.shape[0]
    onehot = F.one_hot(labels, num_classes).to(dtype)
    if analytic:
        probabilities = torch.full_like(onehot, 1.0 / num_classes)
    else:
        probabilities = torch.softmax(features @ weight.T.to(dtype) + bias.to(dtype), dim=1)
    residual = (probabilities - onehot) / features.shape[0]
    return residual.T @ features, residual.sum(0)


def lgm_loss(syn_features: torch.Tensor, syn_labels: torch.Tensor, real_features: torch.Tensor,
             real_labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
             analytic: bool = False) -> torch.Tensor:
    """Linear gradient matching (Eq. 3): 1 - cos over the flattened [vec(dW), db] of real vs synthetic.

    The real gradient is a fixed target, so it is computed without a graph (no memory held for it).
    """
    with torch.no_grad():
        real_weight, real_bias = linear_head_gradient(real_features, real_labels, weight, bias, analytic=analytic)
    syn_weight, syn_bias = linear_head_gradient(syn_features, syn_labels, weight, bias, analytic=analytic)
    real = torch.cat([real_weight.flatten(), real_bias])
    synthetic = torch.cat([syn_weight.flatten(), syn_bias])
    return 1 - flow_cosine(real, synthetic)


def random_linear_head(num_classes: int, dim: int, *, generator: torch.Generator | None = None, std: float = 0.01,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """LGM's per-step head (section 3.1): W ~ N(0, std^2) [C, D], b = 0 [C]."""
    # Draw on the generator's own device (randn requires it), so a seeded CPU generator yields
    # the same head whatever device it is then moved to.
    draw_device = generator.device if generator is not None else device
    weight = torch.randn(num_classes, dim, generator=generator, dtype=dtype, device=draw_device) * std
    return weight.to(device), torch.zeros(num_classes, dtype=dtype, device=device)
