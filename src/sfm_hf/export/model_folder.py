"""``model/``, the model repo: the SFMForImageClassification bundle (phi_e, projector, golden head) and its card."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backbones import FrozenBackbone, load_backbone
from ..layout import CARD_FILE, CONFIG_FILE, VARIANTS_DIR, RunLayout
from ..names import OPEN_CLIP_PREFIXES, is_hub_id, public_name, slug
from ..registry import bundle_projector_mode
from ..statistics import load_golden_tensors
from ..utils import load_tensors
from .cards import PAPER, make_card
from .dataset_folder import DatasetVariant, read_variant
from .facts import ExportError, RepoNames, RunFacts, bundle_backbone, public_config_yaml


@dataclass
class Projector:
    """The projector the bundle holds, and the accuracy measured for exactly it with the golden classifier."""

    weight: torch.Tensor
    bias: torch.Tensor
    kind: str  # "trained" (Stage III, Eq. 10) or "identity" (phi_e == phi_d, no Stage III)
    accuracy: float | None
    source: str
    # Weight of the class-mean anchor pairs in its fit (evaluate.projector_anchors); 0: synthetic images only.
    anchors: float = 0.0
    # What real train data its fit read through the eval backbone (results.json's real_eval_data; the anchors'
    # pairs are real only there, from the statistics on the distillation backbone).
    real_eval_data: list[str] = field(default_factory=list)
    # Trained on the distillation backbone itself: its optimum is the identity whatever the images.
    same_network: bool = False


def _bundle_projector_record(facts: RunFacts, eval_name: str) -> dict[str, Any] | None:
    """The latest Stage III row of this run's synthetic set through ``eval_name`` whose projector a bundle holds (ci)."""
    matching = [
        record for record in facts.results
        if record.get("mode") == bundle_projector_mode().name and record.get("train_set") == facts.config.distill.method
        and record.get("eval_backbone") == eval_name and record.get("distill_backbone") == facts.config.backbone
        and record.get("ipc") in (None, facts.config.ipc) and record.get("projector")
    ]
    return matching[-1] if matching else None


def choose_projector(facts: RunFacts, eval_name: str, distill_dim: int) -> Projector:
    mode = bundle_projector_mode().name
    record = _bundle_projector_record(facts, eval_name)
    if record is not None:
        path = facts.output_dir / record["projector"]
        if not path.is_file():
            raise ExportError(f"results.json names the projector {path}, which does not exist: run 'evaluate' again.")
        tensors = load_tensors(path, "a projector", "run the 'evaluate' stage again", keys=("weight", "bias"))
        return Projector(tensors["weight"], tensors["bias"], "trained", record.get("projector_accuracy"),
                         f"Stage III trained this projector (mode {mode}, `{record['projector']}`) and scored it",
                         float(record.get("projector_anchors") or 0.0), list(record.get("real_eval_data") or []),
                         eval_name == facts.config.backbone)
    if eval_name == facts.config.backbone:
        accuracy = facts.golden.get("eval_accuracy") if facts.golden else None
        return Projector(torch.eye(distill_dim), torch.zeros(distill_dim), "identity", accuracy,
                         "the projector is the identity (the encoder is the distillation backbone), so this is the "
                         "golden classifier's own accuracy from Stage I")
    raise ExportError(
        f"The model bundle for evaluation backbone {eval_name!r} needs the projector that the 'evaluate' stage "
        f"trains (mode {mode} on train set {facts.config.distill.method!r}), and {RunLayout(facts.output_dir).results_file} has "
        f"none: run the 'evaluate' stage with `evaluate.modes` including {mode}, or set `hub.eval_backbone` to the "
        "distillation backbone."
    )


def stage_geometry(image_size: int, crop_ratio: float) -> dict[str, Any]:
    """Resize/crop settings of Stage I's real-image pipeline (data.resize_center_crop), as processor keys."""
    return {
        "size": {"shortest_edge": max(image_size, round(image_size / crop_ratio))},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
    }


def describe_geometry(values: dict[str, Any]) -> str:
    """'shorter side 256 px, centre crop 224x224' from an image processor's settings."""
    size = values.get("size") or {}
    if "shortest_edge" in size:
        text = f"shorter side {size['shortest_edge']} px"
    elif "height" in size and "width" in size:
        text = f"{size['height']}x{size['width']} px"
    else:
        text = f"size {size}"
    crop = values.get("crop_size") or {}
    if values.get("do_center_crop") and "height" in crop:
        text += f", centre crop {crop['height']}x{crop['width']}"
    return text


def save_image_processor(backbone: FrozenBackbone, crop_ratio: float, folder: Path) -> str:
    """The bundle's image processor (pipeline needs it); returns a description for the card.

    Always Stage I/III's own preprocessing, never the backbone's shipped processor: the card's
    accuracy was measured with this geometry (shorter side to size / crop_ratio, bicubic, centre
    crop) and the backbone's mean/std as the run used them (``data.normalization``), and another
    geometry scores something else (DINOv2's own: shorter side 256 for every crop_ratio).
    """
    from transformers import BitImageProcessor

    info = backbone.info
    BitImageProcessor(
        **stage_geometry(backbone.image_size, crop_ratio),
        do_resize=True,
        resample=3,  # PIL bicubic, as data.resize_center_crop
        do_rescale=True,
        do_normalize=True,
        image_mean=list(info.mean),
        image_std=list(info.std),
        do_convert_rgb=True,
    ).save_pretrained(folder)
    return "the preprocessing of Stage I and III (the geometry and mean/std the accuracy was measured with)"


def build_bundle(facts: RunFacts, eval_name: str, backbone: FrozenBackbone, projector: Projector,
                 golden: dict[str, torch.Tensor]):
    """The in-memory SFMForImageClassification holding phi_e, P and the golden classifier."""
    from ..configuration_sfm import SFMConfig
    from ..modeling_sfm import CUSTOM_PIPELINES, SFMForImageClassification

    vision_config = backbone.model.config
    # The loader records where it read the backbone from (a local path, perhaps); the bundle says it in backbone_id.
    vision_config.name_or_path = ""
    class_names = facts.class_names
    config = SFMConfig(
        vision_config=vision_config,
        feature_dim=backbone.feature_dim,
        distill_feature_dim=golden["weight"].shape[1],
        backbone_weights="embedded" if facts.config.hub.embed_backbone else "reference",
        # An embedded encoder needs no address, so a local folder is published by its name only; a referenced one
        # must stay loadable from where it is.
        backbone_id=eval_name if not facts.config.hub.embed_backbone else public_name(eval_name),
        distill_backbone=public_name(facts.config.backbone),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
    )
    config.custom_pipelines = CUSTOM_PIPELINES
    model = SFMForImageClassification(config)
    # After post_init (inside the constructor), which would re-initialise anything loaded earlier.
    model.vision_model.load_state_dict(backbone.model.state_dict())
    model.projector.load_state_dict({"weight": projector.weight, "bias": projector.bias})
    model.classifier.load_state_dict(golden)
    return model.eval()


def bundle_parts(facts: RunFacts) -> tuple[str, FrozenBackbone, Projector, dict[str, torch.Tensor]]:
    """The eval backbone's name, the backbone, the projector and the golden classifier the bundle holds, checked."""
    config = facts.config
    eval_name = bundle_backbone(config)
    if eval_name.startswith(OPEN_CLIP_PREFIXES):
        raise ExportError(
            f"The evaluation backbone {eval_name!r} is an open_clip model, which the transformers bundle cannot "
            "hold: set `hub.eval_backbone` to a transformers backbone, or drop 'model' from `hub.folders`."
        )
    golden = load_golden_tensors(facts.statistics_dir)
    distill_dim = golden["weight"].shape[1]
    projector = choose_projector(facts, eval_name, distill_dim)
    backbone = load_backbone(eval_name, device="cpu", normalization=config.data.normalization)
    expected = (distill_dim, backbone.feature_dim)
    if tuple(projector.weight.shape) != expected:
        raise ExportError(
            f"The projector is {tuple(projector.weight.shape)} but {eval_name!r} gives {backbone.feature_dim}-d "
            f"features and the golden classifier reads {distill_dim}-d: results.json belongs to another run."
        )
    return eval_name, backbone, projector, golden


def save_bundle(model, backbone: FrozenBackbone, crop_ratio: float, folder: Path) -> str:
    """model/ afresh: weights, remote code, image processor; returns where the processor's settings come from."""
    from ..configuration_sfm import SFMConfig
    from ..modeling_sfm import SFMForImageClassification

    if folder.exists():
        shutil.rmtree(folder)
    SFMConfig.register_for_auto_class()
    SFMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    model.save_pretrained(folder)
    return save_image_processor(backbone, crop_ratio, folder)


@dataclass
class BundleFacts:
    """What the model card says about a saved bundle."""

    eval_name: str
    backbone: FrozenBackbone  # phi_e
    feature: str  # the encoder output used as phi_e(x)
    projector: Projector
    variant: DatasetVariant  # the synthetic images behind the projector
    processor_source: str
    measured_geometry: str  # how the eval images were resized for the accuracy the card reports
    head_parameters: int
    encoder_parameters: int
    encoder_bytes: int

    @classmethod
    def measure(cls, model, eval_name: str, backbone: FrozenBackbone, projector: Projector, variant: DatasetVariant,
                processor_source: str, crop_ratio: float) -> "BundleFacts":
        from ..modeling_sfm import feature_output

        return cls(
            eval_name=eval_name, backbone=backbone, feature=feature_output(backbone.model.config.model_type),
            projector=projector, variant=variant, processor_source=processor_source,
            measured_geometry=describe_geometry(stage_geometry(backbone.image_size, crop_ratio)),
            head_parameters=sum(p.numel() for p in (*model.projector.parameters(), *model.classifier.parameters())),
            encoder_parameters=sum(p.numel() for p in model.vision_model.parameters()),
            encoder_bytes=sum(t.numel() * t.element_size() for t in model.vision_model.state_dict().values()),
        )


def export_model(facts: RunFacts, names: RepoNames, license_name: str | None, dataset_folder: Path) -> Path:
    """model/: the bundle with remote code, its image processor and card."""
    eval_name, backbone, projector, golden = bundle_parts(facts)
    model = build_bundle(facts, eval_name, backbone, projector, golden)
    folder = RunLayout(facts.output_dir).model_dir
    processor_source = save_bundle(model, backbone, facts.config.data.crop_ratio, folder)
    variant = read_variant(dataset_folder / VARIANTS_DIR / names.dataset_config)
    bundle = BundleFacts.measure(model, eval_name, backbone, projector, variant, processor_source,
                                 facts.config.data.crop_ratio)
    model_card(facts, names, license_name, bundle).save(folder / CARD_FILE)
    (folder / CONFIG_FILE).write_text(public_config_yaml(facts.recipe, facts.redact))
    return folder


def model_card(facts: RunFacts, names: RepoNames, license_name: str | None, bundle: BundleFacts):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = facts.config
    source = facts.source_dataset
    eval_split = facts.golden.get("eval_split", config.eval_split) if facts.golden else config.eval_split
    projector, eval_name = bundle.projector, bundle.eval_name
    eval_results = None
    if projector.accuracy is not None:
        eval_results = [EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=public_name(source), dataset_name=slug(source),
            dataset_split=eval_split, metric_type="accuracy", metric_name="Top-1 accuracy",
            metric_value=round(float(projector.accuracy), 6),
        )]
    datasets = [name for name in (source, names.dataset) if is_hub_id(name) and "your-org/" not in name]
    card_data = ModelCardData(
        base_model=eval_name if is_hub_id(eval_name) else None,
        datasets=datasets or None,
        license=license_name,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["sfm", "dataset-distillation", "classifier-inheritance", "custom_code"],
        model_name=names.model,
        eval_results=eval_results,
    )
    return make_card(
        ModelCard, "model_card.md.j2", card_data, facts.redact,
        repo_id=names.model,
        dataset_repo=names.dataset,
        dataset_config=names.dataset_config,
        statistics_repo=names.statistics,
        source=public_name(source),
        eval_name=public_name(eval_name),
        distill_name=public_name(config.backbone),
        same_backbone=eval_name == config.backbone,
        family=bundle.backbone.family,
        feature=bundle.feature,
        feature_dim=bundle.backbone.feature_dim,
        distill_dim=projector.weight.shape[0],
        num_classes=len(facts.class_names),
        projector=projector,
        eval_split=eval_split,
        embedded=config.hub.embed_backbone,
        processor_source=bundle.processor_source,
        measured_geometry=bundle.measured_geometry,
        variant=bundle.variant,
        ipc=config.ipc,
        resolution=facts.synthetic.get("resolution"),
        head_parameters=bundle.head_parameters,
        head_bytes=bundle.head_parameters * 4,
        encoder_parameters=bundle.encoder_parameters,
        encoder_bytes=bundle.encoder_bytes,
        golden=facts.golden,
        paper=PAPER,
        versions=facts.versions,
    )

