"""Real-image baselines of Tab. 2: Random, Centroids and Neighbors, chosen in the Stage I feature cache.

Selection works on *positions* in the cached train features of the distillation backbone
phi_d (:func:`sfm_hf.statistics.load_feature_cache`); the cache also records each
position's row number in the train split, so only the chosen rows are decoded again
(:func:`fetch_rows`) and the split is never read in full a second time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import SplitSource, as_float, image_batches
from .errors import UserError


class BaselineError(UserError):
    """A real-image baseline that cannot be built from what Stage I recorded."""


def require_row_indices(indices: torch.Tensor, split: str) -> None:
    """Refuse a cache written from a streamed split: its rows carry no row number to fetch images by.

    A stream can only be re-read from its start, so fetching a handful of chosen images would cost
    a second full pass; materialising the split once is cheaper and exact.
    """
    if bool((indices < 0).any()):
        raise BaselineError(
            f"The real-image baselines (random, centroids, neighbors) fetch chosen rows of split {split!r} by "
            "row number, but Stage I read it as a stream, which has none. Set `data.streaming: false` and run the "
            "'statistics' stage again, or remove these train sets from `evaluate.train_sets`."
        )


def _rows_of_class(labels: torch.Tensor, label: int, need: int) -> torch.Tensor:
    rows = torch.nonzero(labels == label).flatten()
    if len(rows) < need:
        raise BaselineError(f"Class {label} has {len(rows)} train image(s) in the feature cache; ipc={need} needs more.")
    return rows


def random_positions(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` distinct random positions per class, in class order; one draw per seed (one per trial)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        rows = _rows_of_class(labels, label, ipc)
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:ipc]])
    return torch.cat(chosen)


def centroid_positions(features: torch.Tensor, labels: torch.Tensor, class_means: torch.Tensor, ipc: int) -> torch.Tensor:
    """Per class, the ``ipc`` real images nearest in L2 to the class mean embedding, nearest first."""
    chosen = []
    for label in range(len(class_means)):
        rows = _rows_of_class(labels, label, ipc)
        distances = torch.cdist(features[rows].float(), class_means[label : label + 1].float()).flatten()
        chosen.append(rows[torch.argsort(distances, stable=True)[:ipc]])
    return torch.cat(chosen)


def kmeans_positions(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int, seed: int, iterations: int = 20
) -> torch.Tensor:
    """Per class, ``ipc`` distinct real images nearest to the centres of a k-means (k = ipc) of its features.

    Centres start from k-means++ (seeded) and take ``iterations`` Lloyd steps; each centre then takes the
    nearest image no earlier centre took.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(num_classes):
        rows = _rows_of_class(labels, label, ipc)
        points = features[rows].float()
        centres = _kmeans(points, ipc, generator, iterations)
        distances = torch.cdist(centres, points)
        taken: list[int] = []
        for row_distances in distances:
            row_distances = row_distances.clone()
            row_distances[taken] = float("inf")
            taken.append(int(torch.argmin(row_distances)))
        chosen.append(rows[torch.tensor(taken)])
    return torch.cat(chosen)


def _kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int) -> torch.Tensor:
    centres = [points[torch.randint(len(points), (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        nearest = torch.cdist(points, torch.stack(centres)).min(dim=1).values.square()
        centres.append(points[torch.multinomial(nearest / nearest.sum(), 1, generator=generator)].squeeze(0))
    centres = torch.stack(centres)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        for index in range(k):
            members = points[assignment == index]
            if len(members):
                centres[index] = members.mean(dim=0)
    return centres


def neighbor_positions(
    real_features: torch.Tensor,
    real_labels: torch.Tensor,
    synthetic_features: torch.Tensor,
    synthetic_labels: torch.Tensor,
) -> torch.Tensor:
    """For each synthetic image, the same-class real image with the highest cosine similarity.

    Two synthetic images of a class may share a neighbour; the definition (LGM, SFM) does not
    forbid it, and deduplicating would change which image the second one is paired with.
    """
    real = F.normalize(real_features.float(), dim=1)
    synthetic = F.normalize(synthetic_features.float(), dim=1)
    chosen = []
    for vector, label in zip(synthetic, synthetic_labels.tolist()):
        rows = _rows_of_class(real_labels, label, 1)
        chosen.append(rows[torch.argmax(real[rows] @ vector)])
    return torch.stack(chosen)


def fetch_rows(
    source: SplitSource,
    rows: torch.Tensor,
    size: int,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the given rows of ``source`` (order kept) as float images in [0, 1], [N, 3, size, size].

    Each image is resized so that its shorter side is ``size`` and centre-cropped to a square,
    the same framing the synthetic images have; training augments both alike.
    """
    if source.streaming:
        require_row_indices(torch.tensor([-1]), source.split)
    subset = SplitSource(**{**source.__dict__, "dataset": source.dataset.select(rows.tolist())})
    images, labels = [], []
    for batch in image_batches(subset, image_size=size, batch_size=batch_size, crop_ratio=1.0, num_workers=num_workers):
        if batch.skipped:
            raise BaselineError(
                f"Row(s) of split {source.split!r} chosen as baseline images no longer decode: {batch.skipped_examples}."
            )
        images.append(as_float(batch.images))
        labels.append(batch.labels)
    return torch.cat(images), torch.cat(labels)
