import pytest
import torch

from sfm_hf.baselines import (
    BaselineError,
    centroid_positions,
    fetch_rows,
    kmeans_positions,
    neighbor_positions,
    random_positions,
    require_row_indices,
)
from sfm_hf.data import load_rgb, open_split, resize_center_crop


def test_random_draws_ipc_distinct_images_of_each_class_per_seed():
    labels = torch.tensor([0, 1, 2] * 20)
    first = random_positions(labels, 3, 4, seed=3407)
    assert labels[first].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(first.tolist())) == 12
    assert torch.equal(first, random_positions(labels, 3, 4, seed=3407))
    assert not torch.equal(first, random_positions(labels, 3, 4, seed=3408))


def test_kmeans_starts_are_distinct_images_that_cover_each_class():
    generator = torch.Generator().manual_seed(0)
    # Class 0: three tight, far-apart clusters of 10 points; class 1: one blob. ipc 3.
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    class0 = (centres.repeat_interleave(10, dim=0) + torch.randn(30, 2, generator=generator))
    class1 = torch.randn(30, 2, generator=generator) + 100
    features, labels = torch.cat([class0, class1]), torch.tensor([0] * 30 + [1] * 30)
    chosen = kmeans_positions(features, labels, 2, 3, seed=0)
    assert labels[chosen].tolist() == [0] * 3 + [1] * 3
    assert len(set(chosen.tolist())) == 6
    assert sorted(int(position) // 10 for position in chosen[:3]) == [0, 1, 2]  # one image of each cluster
    assert torch.equal(chosen, kmeans_positions(features, labels, 2, 3, seed=0))


def test_centroids_are_the_real_images_nearest_the_class_mean():
    features = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [10.0, 0.0], [12.0, 0.0], [20.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    means = torch.tensor([[1.2, 1.2], [13.0, 0.0]])
    assert centroid_positions(features, labels, means, ipc=1).tolist() == [1, 4]
    assert centroid_positions(features, labels, means, ipc=2).tolist() == [1, 0, 4, 3]


def test_neighbors_are_the_most_cosine_similar_real_images_of_the_same_class():
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 0.1]])
    labels = torch.tensor([0, 0, 1, 1])
    synthetic = torch.tensor([[0.1, 3.0], [1.0, 0.0]])
    # The second synthetic image points along real row 0, but that row is of another class.
    assert neighbor_positions(real, labels, synthetic, torch.tensor([0, 1])).tolist() == [1, 3]


def test_too_few_images_for_ipc_is_a_clear_error():
    with pytest.raises(BaselineError, match="Class 1 has 1 train image"):
        random_positions(torch.tensor([0, 0, 1]), 2, 2, seed=0)


def test_a_streamed_cache_asks_for_streaming_false():
    require_row_indices(torch.arange(5), "train")
    with pytest.raises(BaselineError, match="data.streaming: false"):
        require_row_indices(torch.tensor([-1, -1]), "train")


def test_fetched_rows_are_those_rows_of_the_split_in_order(digits_dir):
    source = open_split(str(digits_dir), "train")
    rows = torch.tensor([17, 3, 1000])
    images, labels = fetch_rows(source, rows, 24, batch_size=2)
    assert images.shape == (3, 3, 24, 24) and images.dtype == torch.float32
    for image, label, row in zip(images, labels.tolist(), rows.tolist()):
        record = source.dataset[row]
        assert label == record["label"]
        expected = torch.from_numpy(resize_center_crop(load_rgb(record["image"]), 24, 1.0)).permute(2, 0, 1) / 255
        torch.testing.assert_close(image, expected)
