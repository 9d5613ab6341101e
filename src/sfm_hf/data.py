"""Reading labelled images: the only module that knows dataset layouts and column names.

A dataset is a Hub id (streamed by default), a local Hub-layout folder, or an image folder
(``train/<class>/*.png``). :func:`open_split` resolves one split and its columns;
:func:`image_batches` yields decoded, resized, centre-cropped uint8 batches for this
process's share of the split. Undecodable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image as PILImage

from .errors import UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DATA_FILE_SUFFIXES = {".parquet", ".arrow", ".csv", ".json", ".jsonl", ".py"}
LABEL_COLUMN_NAMES = ("label", "labels", "class", "fine_label", "target")
IMAGE_COLUMN_NAMES = ("image", "img", "picture", "pixel_values")


class DatasetError(UserError):
    """A dataset, split or column that cannot be used as asked; the message says what exists."""


@dataclass
class SplitSource:
    """One split of a dataset, with the columns resolved and the class names known."""

    dataset: Any  # datasets.Dataset or datasets.IterableDataset, images not decoded
    name: str
    split: str
    image_column: str
    label_column: str
    class_names: list[str]
    label_to_id: dict[Any, int] | None = None  # only when labels are not ClassLabel integers
    streaming: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_rows(self) -> int | None:
        return None if self.streaming else len(self.dataset)


@dataclass
class ImageBatch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # int64 [B]; row number in the split, -1 when streaming
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def pin_memory(self) -> "ImageBatch":
        """Page-locked copy, so that the copy to the GPU can run while the host goes on (DataLoader pin_memory)."""
        return ImageBatch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.skipped,
                          self.skipped_examples)


def _looks_like_image_folder(path: Path) -> bool:
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in DATA_FILE_SUFFIXES for p in files):
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in files)


def _load_dataset_dict(name: str, config_name: str | None, streaming: bool | None):
    import datasets

    path = Path(name)
    if path.is_dir():
        streaming = bool(streaming)
        if not any(p.is_file() and not p.name.startswith(".") for p in path.rglob("*")):
            raise DatasetError(
                f"Dataset folder {name!r} holds no files: put split folders of class folders of images in it "
                "(train/<class>/*.png, test/<class>/*.png) or parquet/arrow files."
            )
        try:
            if _looks_like_image_folder(path):
                return datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming), streaming
            return datasets.load_dataset(str(path), config_name, streaming=streaming), streaming
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
            raise DatasetError(
                f"Cannot read the dataset folder {name!r} ({error.__class__.__name__}: {error}). It should hold "
                "split folders of class folders of images, or parquet/arrow files."
            ) from None
    if path.exists():
        raise DatasetError(f"Dataset {name!r} is a file; give a folder or a Hub dataset id.")
    streaming = True if streaming is None else streaming
    try:
        return datasets.load_dataset(name, config_name, streaming=streaming), streaming
    except Exception as error:  # noqa: BLE001 -- re-raised with the reasons a user can act on
        raise DatasetError(
            f"Cannot open dataset {name!r}: it is not a local folder, and loading it from the Hub failed "
            f"(offline? gated and not logged in? misspelt id?). {error.__class__.__name__}: {error}"
        ) from None


def _detect_column(features: dict, wanted: str | None, kind: str, names: tuple[str, ...], predicate) -> str:
    columns = list(features)
    if wanted is not None:
        if wanted not in features:
            raise DatasetError(f"The {kind} column {wanted!r} does not exist; columns are {columns}.")
        return wanted
    for column, feature in features.items():
        if predicate(feature):
            return column
    for column in names:
        if column in features:
            return column
    if kind == "label":
        # A dataset with one image column and one other simple column leaves no doubt.
        import datasets

        simple = [c for c, f in features.items() if isinstance(f, datasets.Value)]
        if len(simple) == 1 and len(features) == 2:
            return simple[0]
    raise DatasetError(f"No {kind} column found; columns are {columns}. Set `{kind}_column` in the recipe.")


def _class_names_from_values(values) -> tuple[list[str], dict[Any, int]]:
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
    names = [str(v) for v in distinct]
    _warn_case_variants(names)
    return names, {value: index for index, value in enumerate(distinct)}


def _warn_case_variants(class_names: list[str]) -> None:
    """Labels such as 'Cat' and 'cat' are separate classes; usually that is a labelling slip."""
    groups: dict[str, list[str]] = {}
    for name in class_names:
        groups.setdefault(name.casefold(), []).append(name)
    variants = [names for names in groups.values() if len(names) > 1]
    if variants:
        logger.warning(
            "Class names that differ only in case are kept as separate classes: %s. If they are one class, "
            "make the labels identical.", "; ".join(" / ".join(repr(name) for name in names) for names in variants[:10]),
        )


def open_split(
    name: str,
    split: str,
    *,
    config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool | None = None,
) -> SplitSource:
    """Open one split, resolving its image/label columns and class names (no image is decoded)."""
    import datasets

    dataset_dict, streaming = _load_dataset_dict(name, config_name, streaming)
    if split not in dataset_dict:
        raise DatasetError(f"Split {split!r} does not exist in {name!r}; available splits: {list(dataset_dict)}.")
    dataset = dataset_dict[split]
    features = dataset.features
    if features is None:
        raise DatasetError(f"Dataset {name!r} does not declare its features; cannot find the image and label columns.")
    image_column = _detect_column(
        features, image_column, "image", IMAGE_COLUMN_NAMES, lambda f: isinstance(f, datasets.Image)
    )
    try:
        label_column = _detect_column(
            features, label_column, "label", LABEL_COLUMN_NAMES, lambda f: isinstance(f, datasets.ClassLabel)
        )
    except DatasetError:
        # The imagefolder loader drops the label column when a split has a single class folder.
        if Path(name).is_dir():
            _check_class_folders(Path(name), split)
        raise
    _check_column_kinds(features, image_column, label_column)
    label_feature = features[label_column]
    label_to_id = None
    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        _warn_case_variants(class_names)
    else:
        # Without a ClassLabel the classes must be read off the data; only the label column is read.
        values = [row[label_column] for row in dataset.select_columns([label_column])]
        class_names, label_to_id = _class_names_from_values(values)
    if len(class_names) < 2:
        raise DatasetError(
            f"Split {split!r} of {name!r} has {len(class_names)} class(es) {class_names} in column {label_column!r}: "
            "the statistical flow needs at least two classes."
        )
    if Path(name).is_dir():
        _check_no_empty_class_folder(Path(name), split)
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return SplitSource(
        dataset=dataset,
        name=name,
        split=split,
        image_column=image_column,
        label_column=label_column,
        class_names=class_names,
        label_to_id=label_to_id,
        streaming=streaming,
    )


def _check_class_folders(root: Path, split: str) -> None:
    split_dir = root / split
    if not split_dir.is_dir():
        return
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(
            f"Split folder {str(split_dir)!r} has {len(classes)} class folder(s) {classes}: the statistical flow needs "
            "at least two classes (one sub-folder of images per class)."
        )


def _check_no_empty_class_folder(root: Path, split: str) -> None:
    """The imagefolder loader takes its classes from the images it finds, so a class folder without any image
    would vanish from the classes without a word (and from every split where it is equally empty)."""
    split_dir = root / split
    if not split_dir.is_dir():
        return
    empty = sorted(
        folder.name for folder in split_dir.iterdir()
        if folder.is_dir() and not folder.name.startswith(".")
        # A folder of data files belongs to a Hub-layout dataset, not to an image folder.
        and not any(path.suffix.lower() in IMAGE_SUFFIXES | DATA_FILE_SUFFIXES and path.is_file()
                    for path in folder.rglob("*"))
    )
    if empty:
        raise DatasetError(
            f"Class folder(s) {empty[:20]} in {str(split_dir)!r} hold no image ({', '.join(sorted(IMAGE_SUFFIXES))}), "
            "so those classes would be left out: add their images, or remove the folder(s)."
        )


def _check_column_kinds(features: dict, image_column: str, label_column: str) -> None:
    """Catch swapped or mistyped columns now, not as a TypeError deep inside the first batch."""
    import datasets

    if image_column == label_column:
        raise DatasetError(f"`image_column` and `label_column` are both {image_column!r}; they must differ.")
    image_feature, label_feature = features[image_column], features[label_column]
    if isinstance(label_feature, datasets.Image):
        raise DatasetError(
            f"The label column {label_column!r} holds images. Are `image_column` and `label_column` swapped? "
            f"Columns: {list(features)}."
        )
    if not isinstance(image_feature, datasets.Image) and not (
        isinstance(image_feature, datasets.Value) and image_feature.dtype in ("binary", "large_binary", "string")
    ):
        raise DatasetError(
            f"The image column {image_column!r} holds {image_feature}, not images. Are `image_column` and "
            f"`label_column` swapped? Columns: {list(features)}."
        )
    if not isinstance(label_feature, (datasets.ClassLabel, datasets.Value)):
        raise DatasetError(
            f"The label column {label_column!r} holds {type(label_feature).__name__} values, not one label per "
            f"image; set `label_column` to one of {list(features)}."
        )


# High-bit-depth greyscale modes; PIL's convert("RGB") clips their values at 255 instead of scaling.
WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _to_eight_bits(image: PILImage.Image) -> PILImage.Image:
    """A 16-bit, 32-bit integer or float greyscale image scaled to 8 bits ("L").

    16-bit modes span 0..65535. For "I" and "F" the range is read off the values: floats in
    [0, 1] are scaled by 255, values up to 255 are kept, larger ones are taken as 16-bit.
    """
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or top > 255:
        values = values / 257.0
    elif image.mode == "F" and top <= 1.0:
        values = values * 255.0
    return PILImage.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def load_rgb(value: Any) -> PILImage.Image:
    """Decode a datasets Image value ({'bytes', 'path'}) or a PIL image into RGB."""
    if isinstance(value, PILImage.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = PILImage.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = PILImage.open(value["path"])
    else:
        raise ValueError("empty image value")
    if image.mode in WIDE_MODES:
        image = _to_eight_bits(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        # Transparent pixels become white rather than whatever colour their RGB channels held.
        background = PILImage.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def resize_center_crop(image: PILImage.Image, size: int, crop_ratio: float) -> np.ndarray:
    """Shorter side to size / crop_ratio, then a centre crop of size x size; HWC uint8."""
    short = max(size, round(size / crop_ratio))
    width, height = image.size
    scale = short / min(width, height)
    new_width, new_height = max(short, round(width * scale)), max(short, round(height * scale))
    left = (new_width - size) // 2
    top = (new_height - size) // 2
    # Resampling only the source box that becomes the crop gives the same pixels (the filter still
    # reads across the box edge) for a fraction of the work of resizing the whole image first.
    x_scale, y_scale = width / new_width, height / new_height
    box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
    return np.array(image.resize((size, size), PILImage.BICUBIC, box=box), dtype=np.uint8)


def _describe(value: Any, index: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return f"row {index}" if index >= 0 else "a streamed row"


class _Collate:
    """Decodes a list of rows in the DataLoader worker; picklable for multi-worker loading."""

    def __init__(self, source: SplitSource, image_size: int, crop_ratio: float) -> None:
        self.image_column = source.image_column
        self.label_column = source.label_column
        self.label_to_id = source.label_to_id
        self.num_classes = source.num_classes
        self.image_size = image_size
        self.crop_ratio = crop_ratio

    def __call__(self, rows: list[tuple[int, dict]]) -> ImageBatch:
        images, labels, indices, skipped = [], [], [], []
        for index, row in rows:
            label = row[self.label_column]
            if self.label_to_id is not None:
                label = self.label_to_id[label]
            if label is None or not 0 <= int(label) < self.num_classes:
                skipped.append(f"{_describe(row[self.image_column], index)} (label {label!r} out of range)")
                continue
            try:
                array = resize_center_crop(load_rgb(row[self.image_column]), self.image_size, self.crop_ratio)
            except Exception as error:  # noqa: BLE001 -- any undecodable image is skipped and reported
                skipped.append(f"{_describe(row[self.image_column], index)} ({error.__class__.__name__})")
                continue
            images.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(int(label))
            indices.append(index)
        size = self.image_size
        return ImageBatch(
            images=torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8),
            labels=torch.tensor(labels, dtype=torch.int64),
            indices=torch.tensor(indices, dtype=torch.int64),
            skipped=len(skipped),
            skipped_examples=skipped[:5],
        )


class _RowsByIndex(torch.utils.data.Dataset):
    def __init__(self, dataset, start: int, stop: int) -> None:
        self.dataset = dataset
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, position: int) -> tuple[int, dict]:
        index = self.start + position
        return index, self.dataset[index]


class _StreamedRows(torch.utils.data.IterableDataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __iter__(self):
        for row in self.dataset:
            yield -1, row


def rank_share(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint [start, stop) ranges that together cover every row exactly once."""
    return num_rows * rank // world_size, num_rows * (rank + 1) // world_size


def image_batches(
    source: SplitSource,
    *,
    image_size: int,
    batch_size: int,
    crop_ratio: float = 0.875,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    pin_memory: bool | None = None,
) -> Iterator[ImageBatch]:
    """This process's share of the split as decoded uint8 batches.

    The split is divided here, once, between processes; the loader must NOT also go through
    ``accelerator.prepare`` (that would shard it a second time and drop data). Batches are
    decoded and resized in ``num_workers`` worker processes; ``pin_memory`` (None: whenever CUDA
    is available) hands them over in page-locked memory for non-blocking copies to the GPU.
    """
    from datasets.distributed import split_dataset_by_node

    dataset = source.dataset
    if source.streaming:
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        rows = _StreamedRows(split_dataset_by_node(dataset, rank=rank, world_size=world_size))
    else:
        num_rows = len(dataset) if max_samples is None else min(max_samples, len(dataset))
        start, stop = rank_share(num_rows, rank, world_size)
        rows = _RowsByIndex(dataset, start, stop)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_Collate(source, image_size, crop_ratio),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        # One pass per loader (a new shuffle per epoch builds a new one), so workers need not persist.
        persistent_workers=False,
    )
    yield from loader


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]."""
    return images.float().div_(255.0)


class BalancedRealStream:
    """Endless class-balanced batches of real images: ``per_class`` images of each of ``classes`` per draw.

    Used by the LGM baseline, whose real batch holds ipc x aug_rounds images of every class at
    every step. The split is read as a shuffled stream (a new shuffle each epoch), so it works
    for streamed Hub datasets too; extra images of frequent classes wait in bounded queues.
    """

    def __init__(
        self,
        source: SplitSource,
        classes: list[int],
        per_class: int,
        *,
        image_size: int,
        crop_ratio: float,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.source = source
        self.classes = list(classes)
        self.per_class = per_class
        # draw() re-stacks the images into a new tensor, so pinned loader batches would only cost a copy.
        self.loader_options = dict(
            image_size=image_size, crop_ratio=crop_ratio, batch_size=batch_size, num_workers=num_workers,
            rank=rank, world_size=world_size, pin_memory=False,
        )
        self.seed = seed
        self.epoch = 0
        self.queues: dict[int, list[torch.Tensor]] = {c: [] for c in self.classes}
        self._batches: Iterator[ImageBatch] | None = None
        self._classes_this_epoch: set[int] = set()

    def _shuffled(self) -> SplitSource:
        seed = self.seed + self.epoch
        if self.source.streaming:
            dataset = self.source.dataset.shuffle(seed=seed, buffer_size=10_000)
        else:
            dataset = self.source.dataset.shuffle(seed=seed)
        return SplitSource(**{**self.source.__dict__, "dataset": dataset})

    def _next_batch(self) -> ImageBatch:
        while True:
            if self._batches is None:
                self._batches = image_batches(self._shuffled(), **self.loader_options)
                self._classes_this_epoch = set()
            try:
                batch = next(self._batches)
            except StopIteration:
                absent = [c for c in self.classes if c not in self._classes_this_epoch]
                if absent:
                    names = [self.source.class_names[c] for c in absent[:10]]
                    raise DatasetError(
                        f"A whole pass over split {self.source.split!r} found no image of classes {names}."
                    ) from None
                self._batches = None
                self.epoch += 1
                continue
            self._classes_this_epoch.update(batch.labels.tolist())
            return batch

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images [len(classes) * per_class, 3, S, S], labels) in class order."""
        cap = 4 * self.per_class
        while any(len(self.queues[c]) < self.per_class for c in self.classes):
            batch = self._next_batch()
            for image, label in zip(batch.images, batch.labels.tolist()):
                queue = self.queues.get(label)
                if queue is not None and len(queue) < cap:
                    queue.append(image)
        images, labels = [], []
        for c in self.classes:
            images.extend(self.queues[c][: self.per_class])
            del self.queues[c][: self.per_class]
            labels.extend([c] * self.per_class)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
