"""The planning review's ablation matrix: variants of one training run on the same shards and seed, each evaluated
the same way, compared in one table.

A matrix file (configs/ablations/review.yaml is the review's eight) names a base training run, the evaluation, and
the variants as overrides of the base: `model_overrides` and `loss_options` merge key by key into the base's, any
other TrainConfig field replaces. Variants share the shards, the seed and every other setting, so a difference in
the table is the variant's. The review's eight (seed section 四.6 / 八 Phase 5):

  3d_stream         with / without the 3D (struct) stream      bridge_strategy none: video never reads struct
  bridge            bidirectional vs one-way bridge             bridge_two_way false
  fusion_depth      fusion depth 4 / 8 / 12                     bridge_shallow_blocks
  sigma_s_max       struct-noise ceiling 0.5 / 0.7 / 1.0        loss_options.sigma_struct_max
  long_sequence     long-sequence consistency                   every variant's `evaluate` long generation
  struct_tokens     struct tokens per frame 1 / 4 / 8           struct_tokens_per_frame
  flame_loss        with / without the FLAME-alignment loss     loss_options.pose_loss_weight 0
  lipsync_loss      with / without the lip-sync loss            loss_options.lipsync_loss_weight 0

Validated before anything runs (pydantic, and every variant's TrainConfig built), as the program file is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.gates import TrainingGateConfig
from training.program import STAGE_OWNED, LaunchSpecFields, read_config_file, resolve_path
from training.train_config import TrainConfig, config_adapter

REVIEW_ITEMS = ("baseline", "3d_stream", "bridge", "fusion_depth", "sigma_s_max", "long_sequence", "struct_tokens",
                "flame_loss", "lipsync_loss")
MERGED_FIELDS = ("model_overrides", "loss_options")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # a folder name and an artifact key part
    review_item: str  # which of the review's questions it answers (REVIEW_ITEMS)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the base run

    @field_validator("review_item")
    @classmethod
    def _known_item(cls, item: str) -> str:
        if item not in REVIEW_ITEMS:
            raise ValueError(f"review_item must be one of {REVIEW_ITEMS}, got {item!r}")
        return item


class AblationMatrix(_Strict):
    name: str
    out_dir: str  # relative to the matrix file
    shards: list[str] = Field(min_length=1)  # shard-set folders, relative to the matrix file
    split: str = "train"
    launch: LaunchSpecFields = Field(default_factory=LaunchSpecFields)
    parallel: int = Field(default=1, ge=1)  # variants trained at once (each takes launch.nproc_per_node processes)
    train: dict[str, Any] = Field(default_factory=dict)  # the base run every variant changes one thing of
    gates: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)  # training.evaluate.EvaluateOptions fields
    variants: list[VariantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> "AblationMatrix":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        owned = sorted(set(self.train).union(*(v.train for v in self.variants)) & set(STAGE_OWNED))
        if owned:
            raise ValueError(f"{owned} are set from the matrix's shards, not in train")
        config_adapter(TrainingGateConfig).validate_python(self.gates)
        for variant in self.variants:  # unknown keys and bad values, per variant, before anything runs
            cfg = TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": 9, **variant_train(self, variant)})
            try:
                cfg.model_config()
            except TypeError as exc:  # a model_overrides key DualForceConfig does not have
                raise ValueError(f"variant {variant.name}: model_overrides: {exc}") from None
        return self

    def resolved(self, base: Path) -> "AblationMatrix":
        data = self.model_dump()
        data["out_dir"] = resolve_path(base, self.out_dir)
        data["shards"] = [resolve_path(base, s) for s in self.shards]
        return AblationMatrix.model_validate(data)

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)


def variant_train(matrix: AblationMatrix, variant: VariantSpec) -> dict[str, Any]:
    """The base run's TrainConfig fields with the variant's: model_overrides and loss_options merged key by key."""
    train = dict(matrix.train)
    for key, value in variant.train.items():
        if key in MERGED_FIELDS:
            if not isinstance(value, dict) or not isinstance(train.get(key, {}), dict):
                raise ValueError(f"variant {variant.name}: {key} is a mapping of fields, got {value!r}")
            train[key] = {**train.get(key, {}), **value}
        else:
            train[key] = value
    return train


def load_matrix(source: str | Path | dict[str, Any]) -> AblationMatrix:
    """A matrix file (.yaml / .json) or a parsed dict; paths resolved against the file's folder."""
    data, base = read_config_file(source, "an ablation matrix")
    return AblationMatrix.model_validate(data).resolved(base)


def comparison_rows(matrix: AblationMatrix, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: its review item, training verdict and final loss, and each metric's mean with its
    change against the baseline (the first variant of item `baseline`, else the first variant)."""
    baseline = next((v.name for v in matrix.variants if v.review_item == "baseline"), matrix.variants[0].name)
    base_metrics = results.get(baseline, {}).get("metrics", {})
    rows = []
    for variant in matrix.variants:
        result = results.get(variant.name, {})
        row: dict[str, Any] = {"variant": variant.name, "review_item": variant.review_item,
                               "training": result.get("verdict", "not run"), "final_loss": result.get("final_loss")}
        for metric, value in sorted(result.get("metrics", {}).items()):
            row[metric] = value
            base = base_metrics.get(metric)
            if variant.name != baseline and value is not None and base is not None:
                row[f"{metric} vs baseline"] = value - base
        rows.append(row)
    return rows


def plot_comparison(rows: list[dict[str, Any]], metrics: list[str], out_png: Path) -> Optional[Path]:
    """One bar chart per metric, a bar per variant (skipped metrics have no bar); None without any number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in rows)]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(6.0, 0.9 * len(rows) + 2), 2.4 * len(shown)), squeeze=False)
    names = [r["variant"] for r in rows]
    for ax, metric in zip(axes[:, 0], shown):
        values = [r.get(metric) if isinstance(r.get(metric), (int, float)) else 0.0 for r in rows]
        bars = ax.bar(names, values, color=["#4c72b0" if isinstance(r.get(metric), (int, float)) else "#dddddd"
                                            for r in rows])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
