import datasets
import numpy as np
import pytest
import torch

from sfm_hf.data import BalancedRealStream, DatasetError, image_batches, open_split, rank_share


def all_batches(source, **options):
    return list(image_batches(source, image_size=16, batch_size=5, **options))


def test_image_folder_modes_and_corrupt_files(make_image_folder):
    root = make_image_folder(per_class=4, corrupt=2)
    source = open_split(str(root), "train")
    assert source.class_names == ["cat", "dog", "eel"]
    batches = all_batches(source)
    images = torch.cat([b.images for b in batches])
    assert images.shape == (12, 3, 16, 16) and images.dtype == torch.uint8
    assert sum(b.skipped for b in batches) == 2
    examples = [e for b in batches for e in b.skipped_examples]
    assert any("broken" in e for e in examples)
    assert sorted(torch.cat([b.labels for b in batches]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_missing_split_and_columns_name_what_exists(digits_dir):
    with pytest.raises(DatasetError, match=r"Split 'validation' does not exist.*\['train', 'test'\]"):
        open_split(str(digits_dir), "validation")
    with pytest.raises(DatasetError, match=r"label column 'fine_label' does not exist; columns are \['image', 'label'\]"):
        open_split(str(digits_dir), "train", label_column="fine_label")
    with pytest.raises(DatasetError, match="Hub"):
        open_split("nobody/no-such-dataset-xyz", "train")


def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    table = datasets.Dataset.from_dict(
        {"img": images, "species": ["zebra", "ant", "zebra", "moth"]},
        features=datasets.Features({"img": datasets.Image(), "species": datasets.Value("string")}),
    )
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    source = open_split(str(tmp_path), "train")
    assert (source.image_column, source.label_column) == ("img", "species")
    assert source.class_names == ["ant", "moth", "zebra"]
    labels = torch.cat([b.labels for b in all_batches(source)]).tolist()
    assert labels == [2, 0, 2, 1]


def test_no_label_column_is_clear(tmp_path):
    from PIL import Image

    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))]}, features=datasets.Features({"image": datasets.Image()}))
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(DatasetError, match=r"No label column found; columns are \['image'\]"):
        open_split(str(tmp_path), "train")


@pytest.mark.parametrize("streaming", [False, True])
def test_ranks_read_disjoint_shares_covering_everything(digits_dir, streaming):
    seen = []
    for rank in range(3):
        source = open_split(str(digits_dir), "test", streaming=streaming)
        labels = torch.cat([b.labels for b in all_batches(source, rank=rank, world_size=3)])
        seen.append(labels)
    everything = torch.cat([b.labels for b in all_batches(open_split(str(digits_dir), "test"))])
    assert sum(len(s) for s in seen) == len(everything) == 450
    assert torch.equal(torch.bincount(torch.cat(seen)), torch.bincount(everything))


def test_rank_share_partitions_rows():
    for rows, world in [(10, 3), (7, 2), (2, 2), (100, 8)]:
        covered = [i for rank in range(world) for i in range(*rank_share(rows, rank, world))]
        assert covered == list(range(rows))


def test_balanced_real_stream_draws_every_class(make_image_folder):
    source = open_split(str(make_image_folder(per_class=3)), "train")
    stream = BalancedRealStream(source, [0, 2], per_class=2, image_size=8, crop_ratio=1.0, batch_size=4, seed=1)
    for _ in range(5):  # more draws than one pass holds: the stream must cycle
        images, labels = stream.draw()
        assert images.shape == (4, 3, 8, 8)
        assert labels.tolist() == [0, 0, 2, 2]
    red_means = images.float()[:, 0].mean(dim=(1, 2))
    assert np.all(red_means[:2].numpy() < red_means[2:].numpy())
