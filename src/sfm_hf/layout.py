"""Where everything of a run lives: the folder and file names of an ``output_dir``, in one place.

::

    <output_dir>/
      config.yaml                 the resolved config of the last run (runner)
      .lock                       held by the run using the folder (utils.OutputDirLock)
      statistics/                 Stage I: statistics.safetensors, statistics.json, golden_classifier.safetensors
                                  + .json, features/{train,eval}-rankRR-KKKKK.safetensors (the float16 feature
                                  cache); export adds README.md, config.yaml
      checkpoints/rankRR.pt       Stage II: resumable state, one file per process
      synthetic/                  Stage II: images.safetensors, synthetic.json, preview.png, snapshots/ (with
                                  distill.snapshot_every; sfm_hf.snapshots, never exported);
                                  export adds data/<config>/ (one Hub dataset config each) and README.md
      results.json, results.md    Stage III: one record per train set x backbones x mode, the paper-style tables
      evaluation/                 Stage III: accuracy_curves.png, flow_pca.png, projectors/<backbone>.safetensors,
                                  time_to_quality.{json,md,png} (evaluate.time_to_quality),
                                  features/<backbone>/ (eval-backbone feature caches)
      model/                      export: the classifier bundle
      backbones/<slug>/           a joint run (`backbone: [A, B]`) only: one member folder per listed backbone,
                                  laid out like an output_dir (statistics/, results.json, results.md, evaluation/);
                                  synthetic/ and checkpoints/ stay in output_dir (sfm_hf.multi)

A statistics folder has the same files wherever it is (``statistics_from`` points at another one), so
its file names are module constants; paths inside an output_dir come from :class:`RunLayout`.
"""

from __future__ import annotations

from pathlib import Path

from .names import backbone_slug

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
CARD_FILE = "README.md"

# Stage I, in any statistics folder.
STATISTICS_DIR = "statistics"
STATISTICS_TENSORS = "statistics.safetensors"
STATISTICS_JSON = "statistics.json"
GOLDEN_TENSORS = "golden_classifier.safetensors"
GOLDEN_JSON = "golden_classifier.json"
FEATURES_DIR = "features"
STATISTICS_OUTPUTS = (STATISTICS_TENSORS, STATISTICS_JSON, GOLDEN_TENSORS, GOLDEN_JSON)
# Present while sfm_hf.merge writes a statistics folder (statistics.json, written last, marks a finished merge).
MERGING_MARKER = "merging"

# Stage II, in any synthetic folder (this run's, or another run's in evaluate.extra_synthetic).
SYNTHETIC_DIR = "synthetic"
IMAGES_FILE = "images.safetensors"
SYNTHETIC_JSON = "synthetic.json"
PREVIEW_FILE = "preview.png"
CHECKPOINTS_DIR = "checkpoints"

# Stage III.
RESULTS_FILE = "results.json"
RESULTS_MARKDOWN = "results.md"
EVALUATION_DIR = "evaluation"
PROJECTORS_DIR = "projectors"
CURVES_PLOT = "accuracy_curves.png"
FLOW_PLOT = "flow_pca.png"

# export: synthetic/data/<config>/ and model/.
VARIANTS_DIR = "data"
MODEL_DIR = "model"

# A joint run's member folders.
MEMBERS_DIR = "backbones"


def feature_shard(cache_dir: Path, prefix: str, rank: int, number: int) -> Path:
    """Shard ``number`` of process ``rank``'s features of split ``prefix`` (train / eval) in a feature cache."""
    return cache_dir / f"{prefix}-rank{rank:02d}-{number:05d}.safetensors"


def feature_shards(cache_dir: Path, prefix: str) -> list[Path]:
    """Every shard of split ``prefix`` in a feature cache, in rank and shard order."""
    return sorted(cache_dir.glob(f"{prefix}-rank*-*.safetensors"))


def projector_path(eval_backbone: str) -> str:
    """Where the trial-0 CI projector of an eval backbone is saved, relative to output_dir (results.json says it)."""
    return f"{EVALUATION_DIR}/{PROJECTORS_DIR}/{backbone_slug(eval_backbone)}.safetensors"


def _inside(name: str) -> property:
    return property(lambda layout: layout.root / name, doc=f"<output_dir>/{name}")


class RunLayout:
    """The paths of one output_dir."""

    def __init__(self, output_dir: str | Path) -> None:
        self.root = Path(output_dir)

    config_file = _inside(CONFIG_FILE)
    # This run's own Stage I folder (hub.statistics_dir resolves `statistics_from` instead).
    statistics_dir = _inside(STATISTICS_DIR)
    synthetic_dir = _inside(SYNTHETIC_DIR)
    checkpoints_dir = _inside(CHECKPOINTS_DIR)
    results_file = _inside(RESULTS_FILE)
    results_markdown = _inside(RESULTS_MARKDOWN)
    evaluation_dir = _inside(EVALUATION_DIR)
    model_dir = _inside(MODEL_DIR)

    def checkpoint(self, rank: int) -> Path:
        return self.checkpoints_dir / f"rank{rank:02d}.pt"

    def feature_cache(self, backbone: str) -> Path:
        """Stage III's feature cache of an eval backbone other than the distillation one (Stage I caches that)."""
        return self.evaluation_dir / FEATURES_DIR / backbone_slug(backbone)

    def projector(self, eval_backbone: str) -> Path:
        return self.root / projector_path(eval_backbone)

    def member_dir(self, backbone: str) -> Path:
        """A joint run's folder for one of its listed backbones."""
        return self.root / MEMBERS_DIR / backbone_slug(backbone)
