"""The options of the export and of publishing to the Hub (``hub.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from .options import ConfigError, check_choice, option


HUB_FOLDERS = ("dataset", "model", "statistics")
HUB_PLACEHOLDERS = ("org", "dataset", "backbone", "eval_backbone", "ipc", "method")


@dataclass
class HubOptions:
    push: bool = option(
        False,
        "Upload the exported folders to the Hugging Face Hub (main process only). The token comes from the usual "
        "huggingface_hub places (HF_TOKEN, `hf auth login`) and is never printed or written.",
    )
    org: str = option("", "User or organisation owning the repos ({org}); required when push is true.")
    dataset_repo: str = option(
        "{org}/sfm-{dataset}-ipc{ipc}",
        "Dataset repo of the synthetic images: one per (source dataset, ipc), each distillation backbone a named "
        "config. Placeholders: {org} {dataset} {backbone} {eval_backbone} {ipc} {method}.",
    )
    dataset_config_name: str = option(
        "{backbone}",
        "This run's config name in the dataset repo (same placeholders), e.g. '{backbone}-ipc{ipc}' to keep several "
        "ipc in one repo.",
    )
    model_repo: str = option(
        "{org}/sfm-{dataset}-{backbone}-ipc{ipc}",
        "Model repo of the classifier bundle (same placeholders; add {eval_backbone} when bundles for several "
        "evaluation backbones are pushed).",
    )
    statistics_repo: str = option(
        "{org}/sfm-{dataset}-{backbone}-statistics",
        "Model repo of the Stage I statistics and golden classifier (same placeholders).",
    )
    private: bool = option(False, "Create the repos as private.")
    revision: str | None = option(
        None, "Branch to commit to (created from the default branch when missing); null: the default branch (main)."
    )
    create_pr: bool = option(
        False, "Open a pull request with each repo's commit instead of committing to the branch (review first)."
    )
    folders: list[str] = option(
        help=f"Folders to export and push: {', '.join(HUB_FOLDERS)} (the synthetic dataset is always exported; "
        "drop model for an open_clip evaluation backbone, statistics to keep them private).",
        factory=lambda: list(HUB_FOLDERS),
    )
    dataset_name: str | None = option(
        None, "Short name of the source dataset in repo names ({dataset}), e.g. in100; null: last part of `dataset`."
    )
    backbone_name: str | None = option(
        None, "Short name of the distillation backbone ({backbone}), e.g. dinov2; null: last part of `backbone`."
    )
    eval_backbone: str | None = option(
        None,
        "Evaluation backbone held by the model bundle; null: the first of `eval_backbones` (the distillation "
        "backbone when that list is empty).",
    )
    embed_backbone: bool = option(
        True,
        "Save the evaluation backbone's weights inside model/ (self-contained); false stores only its Hub id, and "
        "from_pretrained loads the weights from there.",
    )
    license: str | None = option(
        None, "License field of the dataset and model cards; null: the source dataset's license when known."
    )
    include_runs: list[str] = option(
        help="output_dirs of other exported runs (another backbone or ipc) whose dataset configs are copied into "
        "this run's synthetic/ as further named configs.",
        factory=list,
    )

    def validate(self) -> None:
        import string

        for folder in self.folders:
            check_choice("hub.folders", folder, HUB_FOLDERS)
        for key in ("dataset_repo", "dataset_config_name", "model_repo", "statistics_repo"):
            try:
                fields = [name for _, name, _, _ in string.Formatter().parse(getattr(self, key)) if name is not None]
            except ValueError as error:
                raise ConfigError(f"`hub.{key}` is not a valid template: {error}.") from None
            unknown = [name for name in fields if name not in HUB_PLACEHOLDERS]
            if unknown:
                raise ConfigError(f"`hub.{key}` uses unknown placeholder(s) {unknown}; known: {list(HUB_PLACEHOLDERS)}.")
        if self.push and not self.org:
            raise ConfigError("`hub.push` is true but `hub.org` is empty: give your user or organisation name.")

