"""The ablation matrix: the review's eight as one file, variants that change exactly what they say, a comparison
table against the baseline, and the flow that trains, exports and evaluates two variants end to end (slow)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.ablation import comparison_rows, load_matrix, plot_comparison, variant_train
from training.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def test_the_review_matrix_covers_the_eight_and_each_variant_changes_one_thing():
    m = load_matrix(REPO / "configs" / "ablations" / "review.yaml")
    items = {v.review_item for v in m.variants}
    assert items == {"baseline", "3d_stream", "bridge", "fusion_depth", "sigma_s_max", "struct_tokens", "flame_loss",
                     "lipsync_loss"}  # long_sequence: every variant's evaluation (evaluate.long_seconds)
    assert m.evaluate["long_seconds"] == 60.0
    base = TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": 9, **variant_train(m, m.variant("baseline"))})
    for variant in m.variants:
        cfg = TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": 9, **variant_train(m, variant)})
        model_changes = {k for k, v in vars(cfg.model_config()).items() if getattr(base.model_config(), k) != v}
        loss_changes = {k for k in set(cfg.loss_options) | set(base.loss_options)
                        if cfg.loss_options.get(k) != base.loss_options.get(k)}
        expected = {  # what each variant may change, and nothing else
            "baseline": (set(), set()), "no-3d-stream": ({"bridge_strategy"}, {"pose_loss_weight"}),
            "one-way-bridge": ({"bridge_two_way"}, set()), "fusion-depth-4": ({"bridge_shallow_blocks"}, set()),
            "fusion-depth-12": ({"bridge_shallow_blocks"}, set()), "sigma-s-max-0.5": (set(), {"sigma_struct_max"}),
            "sigma-s-max-1.0": (set(), {"sigma_struct_max"}),
            "struct-tokens-1": ({"struct_tokens_per_frame"}, set()), "struct-tokens-8": ({"struct_tokens_per_frame"}, set()),
            "no-flame-loss": (set(), {"pose_loss_weight"}), "no-lipsync-loss": ({"lipsync_embed_dim"}, {"lipsync_loss_weight"}),
        }[variant.name]
        assert (model_changes, loss_changes) == expected, variant.name
        assert cfg.seed == base.seed and cfg.total_steps == base.total_steps


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["variants"].append(dict(d["variants"][0])), "repeat"),
    (lambda d: d["variants"][0].update(review_item="vibes"), "review_item"),
    (lambda d: d["variants"][0].update(train={"lr_typo": 1}), "unknown training config keys"),
    (lambda d: d["variants"][0].update(train={"model_overrides": {"bridge_strategy": "sideways"}}), "bridge_strategy"),
    (lambda d: d["train"].update(window_frames=17), "set from the matrix's shards"),
])
def test_a_bad_matrix_is_refused_before_anything_runs(edit, message):
    import yaml
    from pydantic import ValidationError

    data = yaml.safe_load((REPO / "configs" / "ablations" / "review.yaml").read_text())
    edit(data)
    with pytest.raises((ValidationError, ValueError), match=message):
        load_matrix(data)


def test_comparison_rows_and_plot(tmp_path):
    m = load_matrix({"name": "t", "out_dir": str(tmp_path), "shards": ["s"], "variants": [
        {"name": "a", "review_item": "baseline"}, {"name": "b", "review_item": "bridge"},
        {"name": "c", "review_item": "flame_loss"}]})
    results = {"a": {"verdict": "GO", "final_loss": 1.0, "metrics": {"lmd_mouth": 2.0, "fid": None}},
               "b": {"verdict": "GO", "final_loss": 0.9, "metrics": {"lmd_mouth": 1.5, "fid": None}},
               "c": {"verdict": "NO-GO", "final_loss": None, "metrics": {}}}
    rows = comparison_rows(m, results)
    assert rows[1]["lmd_mouth vs baseline"] == pytest.approx(-0.5) and "fid vs baseline" not in rows[1]
    assert rows[2] == {"variant": "c", "review_item": "flame_loss", "training": "NO-GO", "final_loss": None}
    assert plot_comparison(rows, ["lmd_mouth", "fid"], tmp_path / "p.png").is_file()
    assert plot_comparison(rows, ["fid"], tmp_path / "q.png") is None  # nothing to draw: no file, no fake bars


@pytest.mark.slow
def test_two_variants_end_to_end(tmp_path, samples_dir, prefect_test_server):
    """Toy scale on CPU: baseline and the one-way bridge, 2 steps each, exported, evaluated on the test split."""
    from flows.ablate import ablation_flow
    from tasks.feature_models import dryrun_models
    from tests.training_shards import real_media, write_shards

    models = dryrun_models()
    meta = {"extractors": {"wan_vae": models.wan_vae, "hubert": models.hubert},
            "untrained_dryrun_models": ["audio_features", "vae_latents"]}
    shards = tmp_path / "shards"
    for split, n in (("train", 2), ("test", 1)):
        write_shards(shards / split, n_shards=1, per_shard=n, seed=len(split), split=split,
                     media=real_media(samples_dir / "yongen.mp4"), meta_extra=meta)
    (shards / "stats.json").write_text(json.dumps({"profile": "talking_head", "window_frames": 9, "crop_size": 64,
                                                   "audio_dim": 32, "samples": 3}))
    result = ablation_flow({
        "name": "toy", "out_dir": str(tmp_path / "out"), "shards": [str(shards)],
        "train": {"model_variant": "tiny", "total_steps": 2, "ckpt_every": 2, "warmup_steps": 1, "num_workers": 0,
                  "shuffle_buffer": 4, "ema_decay": 0.5},
        "gates": {"memory_step": 1, "convergence_step": None, "joint_step": None, "review_step": None},
        "evaluate": {"split": "test", "clips": 1, "sampler_steps": 1, "long_seconds": 1.2,
                     "liveportrait": models.liveportrait_root},
        "variants": [{"name": "baseline", "review_item": "baseline"},
                     {"name": "one-way-bridge", "review_item": "bridge",
                      "train": {"model_overrides": {"bridge_two_way": False}}}]})
    rows = {r["variant"]: r for r in result["rows"]}
    assert [r["training"] for r in rows.values()] == ["GO", "GO"]
    assert rows["baseline"]["fid"] is None and rows["baseline"]["lse_d"] is None  # skipped: no weights given
    assert rows["baseline"]["pose_error_deg"] >= 0 and "pose_error_deg vs baseline" in rows["one-way-bridge"]
    assert len(rows["baseline"]) and rows["one-way-bridge"]["pose_drift_deg_per_second"] is not None
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| baseline | baseline | GO |" in table and "| one-way-bridge | bridge | GO |" in table
    exported = json.loads((tmp_path / "out" / "one-way-bridge" / "model" / "config.json").read_text())
    assert exported["bridge_two_way"] is False
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["results"]["baseline"]["verdict"] == "GO"
