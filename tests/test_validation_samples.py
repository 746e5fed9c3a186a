"""Validation samples during training: every K steps rank 0 generates the fixed held-out clips from the EMA weights
and writes ground truth | generated mp4s (the clip's speech muxed in), a contact sheet, a record and a TensorBoard
image; the flow publishes the newest round and the review shows it.

Content: the mp4's left half is the clip's own frames, its right half exactly what the sampler makes from the
exported EMA weights with the clip's reference latent, HuBERT rows and the validation seed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks.feature_models import dryrun_models
from tasks.media import VideoWriter, read_audio, read_frames
from tests.training_shards import CROP, WINDOW, real_media, train_config, train_in_process, write_shards

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory, samples_dir):
    from training.train_config import TrainConfig

    root = tmp_path_factory.mktemp("validation")
    models = dryrun_models()
    meta = {"extractors": {"wan_vae": models.wan_vae, "hubert": models.hubert},
            "untrained_dryrun_models": ["audio_features", "vae_latents"]}
    shards = root / "shards"
    media = real_media(samples_dir / "yongen.mp4")
    write_shards(shards / "train", n_shards=1, per_shard=2, seed=3, media=media, meta_extra=meta)
    write_shards(shards / "val", n_shards=1, per_shard=3, seed=4, split="val", media=media, meta_extra=meta)
    (shards / "stats.json").write_text(json.dumps({"profile": "talking_head", "window_frames": WINDOW}))
    train_in_process(TrainConfig.from_dict(train_config(
        shards / "train", root / "run", total_steps=2, ckpt_every=2, ema_decay=0.5, save_weights=True,
        validation={"every": 2, "clips": 2, "sampler_steps": 2, "seed": 5, "conditioning_windows": 3})))
    return root, models


def test_files_of_a_validation_round(validated_run):
    root, _ = validated_run
    samples = root / "run" / "samples"
    record = json.loads((samples / "step000002.json").read_text())
    assert record["step"] == 2 and record["weights"] == "ema" and record["sampler"]["steps"] == 2
    assert [c["split"] for c in record["clips"]] == ["val", "val"]  # the held-out split, not the training one
    assert [c["key"] for c in record["clips"]] == ["clip000_w000000", "clip000_w000001"]  # the first two, fixed
    assert sorted(p.name for p in samples.glob("*.mp4")) == [f"step000002-{c['key']}.mp4" for c in record["clips"]]
    import cv2

    from tasks.contact_sheet import LABEL, caption_bar
    from training.validation import ROW_LABEL_WIDTH, TILE

    png = cv2.cvtColor(cv2.imread(str(samples / "step000002.png")), cv2.COLOR_BGR2RGB)
    row = 2 * TILE + 2 * LABEL  # truth, generated, the times, the caption
    assert png.shape[0] == 2 * row and png.shape[1] == ROW_LABEL_WIDTH + 6 * TILE
    for r in range(2):  # the labels drawn are these texts: the same bars rendered again, pixel for pixel
        top = r * row
        assert np.array_equal(png[top:top + TILE, :ROW_LABEL_WIDTH], caption_bar(ROW_LABEL_WIDTH, "truth", height=TILE))
        assert np.array_equal(png[top + TILE:top + 2 * TILE, :ROW_LABEL_WIDTH],
                              caption_bar(ROW_LABEL_WIDTH, "generated", height=TILE))
        times = png[top + 2 * TILE:top + 2 * TILE + LABEL, ROW_LABEL_WIDTH:]
        # the window's 9 frames at 6 times: 0, 2, 3, 5, 6, 8 (np.linspace rounded), at 25 fps
        for k, frame in enumerate((0, 2, 3, 5, 6, 8)):
            assert np.array_equal(times[:, k * TILE:(k + 1) * TILE], caption_bar(TILE, f"{frame / 25:.2f} s (frame {frame})"))
        caption = png[top + 2 * TILE + LABEL:top + row, ROW_LABEL_WIDTH:]
        key = record["clips"][r]["key"]
        assert np.array_equal(caption, caption_bar(6 * TILE, f"{key} (val) step 2: truth / generated"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("validation/samples")] == [2]


def test_side_by_side_is_truth_and_the_ema_models_sample(validated_run, tmp_path):
    from models.dualforce import DualForce
    from models.dualforce.sampler import SamplerConfig, generate
    from models.wan_vae import load_wan_vae, output_to_frames
    from tasks.contact_sheet import LABEL
    from training.export import export_run
    from training.heldout import held_out_clips
    from training.validation import side_by_side_frames

    root, models = validated_run
    export_run(root / "run", tmp_path / "ema")  # the EMA weights of step 2, as a user would sample from them
    model = DualForce.from_pretrained(tmp_path / "ema")
    wan = load_wan_vae(models.wan_vae)
    clips = held_out_clips(root / "shards", 2)
    for clip in clips:
        written = read_frames(root / "run" / "samples" / f"step000002-{clip.key}.mp4")
        assert written.shape == (WINDOW, LABEL + CROP, 2 * CROP, 3)  # a "truth | generated" bar on top
        truth_error = np.abs(written[:, LABEL:, :CROP].astype(int) - clip.frames).mean()
        assert truth_error < 4.0  # the clip's own frames (two H.264 passes apart)
        bar = side_by_side_frames(clip.frames[:1], clip.frames[:1])[0, :LABEL]
        swapped = np.concatenate([bar[:, CROP:], bar[:, :CROP]], 1)
        label_error = np.abs(written[:, :LABEL].astype(int) - bar).mean()
        assert label_error < np.abs(written[:, :LABEL].astype(int) - swapped).mean() / 2  # truth left, generated right

        def side_by_side(seed):
            latents, _ = generate(model, torch.from_numpy(clip.reference_latent)[None],
                                  torch.from_numpy(clip.audio_features)[None], SamplerConfig(steps=2),
                                  torch.Generator().manual_seed(seed))
            with torch.inference_mode():
                made = output_to_frames(wan.vae.decode(wan.denormalise(latents)).sample)[0][:WINDOW]
            with VideoWriter(tmp_path / f"{clip.key}-{seed}.mp4", 2 * CROP, LABEL + CROP) as writer:
                writer.write(side_by_side_frames(clip.frames, made))
            return read_frames(tmp_path / f"{clip.key}-{seed}.mp4")

        assert np.array_equal(written, side_by_side(5))  # bit-exact H.264: the same frames in, the same out
        assert not np.array_equal(written, side_by_side(6))
        muxed = read_audio(root / "run" / "samples" / f"step000002-{clip.key}.mp4")
        n = min(len(muxed), len(clip.audio))
        assert np.corrcoef(muxed[:n], clip.audio[:n])[0, 1] > 0.95  # the clip's own speech


def test_latest_round_is_what_the_flow_publishes_and_the_review_shows(validated_run, prefect_test_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.review import publish_review_request
    from flows.sample_artifacts import publish_validation_samples

    root, _ = validated_run
    run_dir = root / "run"
    (run_dir / "samples" / "step000001.png").write_bytes((run_dir / "samples" / "step000002.png").read_bytes())

    @flow
    def publish():
        first = publish_validation_samples(run_dir, set())
        again = publish_validation_samples(run_dir, {2})
        publish_review_request(2, run_dir, run_dir / "samples" / "step000002.png", 60, "continue")
        return first, again

    state = publish(return_state=True)
    assert state.result() == (2, None)
    # the session's server holds other tests' artifacts too: this flow run's only
    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        mine = {a.key: a for a in client.read_artifacts(artifact_filter=flt)}
    samples = mine[f"{run_dir.name}-validation-samples"]
    assert "step 2" in samples.description and "clip000_w000000" in samples.data
    review = mine["train-review-request"].data
    assert "step000002.png" in review and "step000001.png" not in review  # the newest round only


def test_the_record_holds_the_ema_models_conditioning_use(validated_run, tmp_path):
    """The round's conditioning rows are those of the EMA weights it sampled with, on the held-out windows."""
    from models.dualforce import DualForce
    from training.conditioning_use import ConditioningUseConfig, held_out_windows, measure_conditioning_use
    from training.export import export_run

    root, _ = validated_run
    record = json.loads((root / "run" / "samples" / "step000002.json").read_text())
    export_run(root / "run", tmp_path / "ema")
    windows, split = held_out_windows(root / "shards", 3)
    assert split == "val"
    use = measure_conditioning_use(DualForce.from_pretrained(tmp_path / "ema"), windows,
                                   ConditioningUseConfig(windows=3, seed=5, drift_sampler_steps=0), split=split)
    rows = {r["metric"]: r for r in record["conditioning"]}
    assert {f.name for f in use.figures} <= set(rows)
    for f in use.figures:
        assert rows[f.name]["ratio (median)"] == pytest.approx(f.ratio_median, abs=1e-4)
        assert rows[f.name]["true loss"] == pytest.approx(f.true_loss, rel=1e-3, abs=1e-5)
