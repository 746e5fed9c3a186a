"""The pretrain stage's data path: video-only shards train the video DiT alone, and joint starts from its weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks import contract
from tests.training_shards import AUDIO_DIM, CROP, WINDOW, train_config, write_shards
from training import checkpoint
from training.loader import LoaderConfig, ShardLoader
from training.metrics import read_metrics
from training.run_status import COMPLETED
from training.train_config import TrainConfig


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video-only")
    write_shards(out, n_shards=2, per_shard=2, seed=4, profile=contract.VIDEO_ONLY)
    return out


def test_video_only_shards_hold_the_video_members_and_load_in_the_video_only_profile(video_shards, tmp_path):
    loader = ShardLoader(LoaderConfig([str(video_shards / "shard-*.tar")], WINDOW, CROP, batch_size=2,
                                      shuffle_buffer=0, profile=contract.VIDEO_ONLY))
    batches = list(loader.epoch_iter())
    assert len(batches) == 2 and not loader.stats.rejected
    assert set(batches[0]) == {"video_latents", "reference_latent", "sample_keys"}
    assert batches[0]["video_latents"].shape == (2, 16, 3, CROP // 8, CROP // 8)
    # the talking-head profile refuses them by name (no struct, audio or keep mask), counted, never raised
    talking = ShardLoader(LoaderConfig([str(video_shards / "shard-*.tar")], WINDOW, CROP, batch_size=1,
                                       shuffle_buffer=0))
    with pytest.raises(RuntimeError, match="yielded no batch"):
        list(talking.epoch_iter())
    assert talking.stats.rejected == {"contract": 4}
    assert "audio.wav: missing" in talking.stats.last_rejections[-1]
    # a talking-head shard set also serves video-only training (VoxCeleb2 may go through either profile)
    heads = tmp_path / "heads"
    write_shards(heads, n_shards=1, per_shard=2, seed=5)
    either = ShardLoader(LoaderConfig([str(heads / "shard-*.tar")], WINDOW, CROP, batch_size=2, shuffle_buffer=0,
                                      profile=contract.VIDEO_ONLY))
    [batch] = list(either.epoch_iter())
    assert set(batch) == {"video_latents", "reference_latent", "sample_keys"}


def test_a_video_only_shard_set_trains_and_joint_starts_from_its_weights(video_shards, tmp_path, single_process_env):
    from training.trainer import Trainer, run_training

    pre_dir = tmp_path / "pretrain"
    pre = TrainConfig.from_dict(train_config(video_shards, pre_dir, video_only=True, save_weights=True,
                                             total_steps=3, ckpt_every=2, lr=1e-3))
    status = run_training(pre)
    assert status.status == COMPLETED and status.step == 3
    records = read_metrics(pre_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["struct_loss"] is None and r["video_loss"] == r["loss"] > 0 for r in records)
    weights_file = checkpoint.weights_path(pre_dir / "checkpoints", checkpoint.latest_tag(pre_dir / "checkpoints"))
    pretrained = checkpoint.load_weights(weights_file)
    assert all(k.startswith(("video_embed.", "reference_embed.", "video_time.", "video_blocks.", "video_head."))
               for k in pretrained)

    heads = tmp_path / "heads"
    write_shards(heads, n_shards=1, per_shard=2, seed=6)
    joint_cfg = TrainConfig.from_dict(train_config(heads, tmp_path / "joint", init_from=str(weights_file),
                                                   total_steps=1, ckpt_every=1, audio_dim=AUDIO_DIM))
    trainer = Trainer(joint_cfg)
    try:
        own = trainer.engine.module.state_dict()
        assert all(torch.equal(own[k], v) for k, v in pretrained.items())  # step 0: exactly the pretrained DiT
        gates = {n: p for n, p in trainer.engine.module.zero_init_parameters().items() if n not in pretrained}
        assert gates and all(torch.count_nonzero(p) == 0 for p in gates.values())  # the new modules start closed
        assert trainer.run().status == COMPLETED
    finally:
        trainer.close()
    # once the joint run has a checkpoint of its own, a restart resumes it and init_from is not applied again
    again = Trainer(TrainConfig.from_dict(dict(joint_cfg.to_dict(), total_steps=2)))
    try:
        resumed = again.engine.module.state_dict()
        assert again.step == 1
        assert any(not torch.equal(resumed[k], v) for k, v in pretrained.items())  # trained past the hand-over
    finally:
        again.close()
