"""What the shard step is given per clip: the crop, the feature sources, and the sample metadata that records which
extractors and versions made it; plus the keys that make a shard group's result reusable.

Plain functions over the step results (no Prefect): the preprocess flow wires them into its shard tasks.
"""
from __future__ import annotations

from typing import Optional

from tasks import contract
from tasks.step_runner import ClipState
from tasks.step_store import StepStore, fingerprint
from tasks.steps.audio_features import AudioFeaturesStep
from tasks.steps.crop import CropStep, crop_frames, crop_segments
from tasks.steps.flame_struct import FlameStructStep
from tasks.steps.pipeline import TALKING_HEAD, PreprocessProfile
from tasks.steps.pose_check import PoseCheckStep
from tasks.steps.shard import SHARD_VERSION, ShardClip, ShardConfig
from tasks.steps.vae_latents import VaeLatentsStep


def struct_source(profile: PreprocessProfile) -> Optional[str]:
    if profile.sample_profile != contract.TALKING_HEAD:
        return None
    return "flame" if FlameStructStep.name in profile.feature_steps else "liveportrait"


def extractor_record(infos: dict[str, dict]) -> dict:
    """Which models made a sample's features (an exported model carries it, so generation uses the same)."""
    record = {"crop_step": CropStep.name}
    audio, vae = infos.get(AudioFeaturesStep.name), infos.get(VaeLatentsStep.name)
    if audio is not None:
        record.update(hubert=audio.get("hubert"), hubert_layers=audio.get("layers"))
    if vae is not None:
        record["wan_vae"] = vae.get("vae")
        if vae.get("vae_subfolder"):
            record["wan_vae_subfolder"] = vae["vae_subfolder"]
    return record


def shard_clip(state: ClipState, store: StepStore, with_features: bool,
                profile: PreprocessProfile = TALKING_HEAD) -> ShardClip:
    crop_dir = store.clip_dir(profile.crop_step, state.row.clip_id)
    infos = {name: rec.info for name, rec in state.records.items()}
    dryrun = sorted(n for n, i in infos.items() if i.get("untrained_dryrun"))
    extra = {"untrained_dryrun_models": dryrun} if dryrun else {}
    if with_features and profile.sample_profile == contract.TALKING_HEAD:
        extra["audio_dim"] = int(infos[AudioFeaturesStep.name]["audio_dim"])
        extra["extractors"] = extractor_record(infos)
        if PoseCheckStep.name in infos:
            extra["pose_check"] = {k: infos[PoseCheckStep.name][k] for k in ("source", "dropped", "total")}
        flame = infos.get(FlameStructStep.name)
        if flame is not None:  # the identity (FLAME shape) is once per clip, not a per-frame row
            extra.update(struct_source="flame", struct_dim=int(flame["struct_dim"]), flame_shape=flame["shape"])
    features = [profile.feature_source({n: store.clip_dir(n, state.row.clip_id) for n in profile.feature_steps})
                ] if with_features else []
    return ShardClip(
        row=state.row, crop_dir=crop_dir, frames=crop_frames(crop_dir), segments=crop_segments(crop_dir),
        step_versions={name: rec.version for name, rec in state.records.items()},
        lineage={name: rec.checksum for name, rec in state.records.items()},
        feature_sources=features,
        meta_extra=extra,
        profile=profile.sample_profile,
    )


def struct_stats(states: list[ClipState], profile: PreprocessProfile) -> Optional[dict]:
    """stats.json's struct source and width, which a trainer builds its struct stream with."""
    source = struct_source(profile)
    if source is None:
        return None
    widths = ({int(s.records[FlameStructStep.name].info["struct_dim"]) for s in states} if source == "flame"
              else {contract.STRUCT_DIM})
    if len(widths) > 1:
        raise ValueError(f"clips of one shard set have FLAME struct widths {sorted(widths)}")
    return {"struct_source": source, "struct_dim": widths.pop() if widths else contract.STRUCT_DIM}


def profile_part(profile: PreprocessProfile) -> tuple:
    """What a shard key adds for the profile: nothing for talking-head (its keys stay what they were)."""
    return () if profile == TALKING_HEAD else (profile.name,)


def group_key(group: str, states: list[ClipState], shard_cfg: ShardConfig, with_features: bool,
               profile: PreprocessProfile = TALKING_HEAD) -> str:
    return fingerprint("shard", SHARD_VERSION, group, shard_cfg, with_features, sorted(
        (s.row.model_dump_json(), sorted((n, r.version, r.checksum) for n, r in s.records.items())) for s in states),
        *profile_part(profile))
