"""Linear heads trained on fixed features: the golden classifier and the full-dataset references."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
) -> nn.Linear:
    """Adam + cosine schedule on (features, labels); deterministic for a given seed and row order."""
    generator = torch.Generator().manual_seed(seed)
    features = features.to(device, torch.float32)
    labels = labels.to(device)
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(features.shape[1])
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=generator))
        head.bias.zero_()
    head = head.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
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


@torch.no_grad()
def accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    predictions = head(features.float()).argmax(dim=-1)
    return (predictions == labels).float().mean().item()
