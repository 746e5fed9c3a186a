"""The per-clip preprocessing steps as objects the step runner can drive (name, version, config, run).

Each adapter is thin: the work lives in the step's own module (tasks/download.py, tasks/crop.py, ...).
Bump a step's `version` when its output for the same input changes; that re-runs it and what depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets_manifest.schema import ClipRow
from tasks import feature_models
from tasks.audio_features import AudioFeatureConfig
from tasks.center_crop import CenterCropConfig, center_crop_clip
from tasks.crop import CROP_AUDIO, CROP_INFO, CROP_LANDMARKS, CROP_VIDEO, CropConfig, crop_clip
from tasks.download import DownloadConfig, download_clip
from tasks.errors import ClipRejected
from tasks.feature_models import FeatureModels
from tasks.pose_check import PoseCheckConfig
from tasks.shard import ShardConfig
from tasks.step_store import fingerprint

DOWNLOADED_VIDEO = "source.mp4"
MOTION_FILE = "motion.npz"
STRUCT_FILE = "struct.npy"
HEAD_POSE_FILE = "head_pose_deg.npy"  # [T, 3] the pose check's aligned independent pitch/yaw/roll (deg), NaN: none
KEEP_MASK_FILE = "keep_mask.npy"
AUDIO_FEATURES_FILE = "audio_features.npy"
VAE_FILE = "vae_latents.npz"


@dataclass
class DownloadStep:
    config: DownloadConfig = field(default_factory=DownloadConfig)
    name: str = "download"
    version: str = "1"
    requires: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        # The settings that change the clip; the cache dir and retry policy do not.
        return self.config.fingerprint()

    def row_fields(self, row: ClipRow) -> dict:
        # The source string keeps its `#sha256=` fragment: a corrected checksum is a different download.
        return {"source": row.source, "start_s": row.start_s, "end_s": row.end_s}

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        result = download_clip(row, out_dir, self.config)
        result.path.rename(out_dir / DOWNLOADED_VIDEO)
        return {"bytes": result.bytes, "sha256": result.sha256, "source_kind": result.source_kind,
                "duration_s": result.duration_s, "trimmed": result.trimmed}


@dataclass
class CropStep:
    config: CropConfig = field(default_factory=CropConfig)
    name: str = "crop"
    version: str = "6"  # 2: manifest face box; 3: luma landmarks, landmark-tracked boxes; 4: scaled near-face search;
    # 5: static segment boxes (default), display rotation, corrupt_stream, silent_audio, small-face search;
    # 6: a drifting landmark track re-detects on the next frame
    requires: tuple[str, ...] = ("download",)

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def row_fields(self, row: ClipRow) -> dict:
        return {"face_box": row.face_box}  # the crop follows the manifest face box

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        r = crop_clip(_downloaded(inputs), out_dir, self.config, face_box=row.face_box)
        return {"frames": r.frames, "audio_samples": r.audio_samples, "trimmed_s": round(r.trimmed_s, 3),
                "median_face_px": round(r.median_face_px, 1), "landmarker": r.landmarker, "mode": r.mode,
                "segments": len(r.segments), "dropped_segments": len(r.dropped_segments)}


@dataclass
class CenterCropStep:
    """Step 2 of the general profile: the frame's centre, no face, no audio (tasks/center_crop.py). Same file
    names as CropStep's output, so VaeLatentsStep(crop_step="center_crop") and the shard writer read it."""

    config: CenterCropConfig = field(default_factory=CenterCropConfig)
    name: str = "center_crop"
    version: str = "1"
    requires: tuple[str, ...] = ("download",)

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        r = center_crop_clip(_downloaded(inputs), out_dir, self.config)
        return {"frames": r.frames, "source_size": list(r.source_size), "box": list(r.box)}


def _downloaded(inputs: dict[str, Path]) -> Path:
    """The download step's clip, which every crop step reads."""
    src = inputs["download"] / DOWNLOADED_VIDEO
    if not src.exists():
        raise ClipRejected("missing_input", f"{src} is missing")
    return src


def crop_frames(crop_dir: Path) -> int:
    return int(crop_info(crop_dir)["frames"])


def crop_info(crop_dir: Path) -> dict:
    import json

    return json.loads((crop_dir / CROP_INFO).read_text())


def crop_segments(crop_dir: Path) -> list[tuple[int, int]]:
    """The [start, end) spans of a crop that training windows may use (the crop step's stable segments)."""
    info = crop_info(crop_dir)
    return [(int(a), int(b)) for a, b in info.get("segments", [(0, info["frames"])])]


def _save_npy(path: Path, array) -> None:
    import numpy as np

    np.save(path, array, allow_pickle=False)


@dataclass
class MotionStep:
    """Step 3: LivePortrait motion latents per frame, plus the flat struct vectors training reads."""

    models: FeatureModels
    batch_size: int = 64
    name: str = "motion"
    version: str = "1"
    requires: tuple[str, ...] = ("crop",)

    def fingerprint(self) -> str:
        return fingerprint(self.models.liveportrait_root, self.models.dryrun, *feature_models.precision_tag(self.models))

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        from models.struct_layout import to_struct
        from tasks.motion import extract_motion_from_video

        motion = extract_motion_from_video(inputs["crop"] / CROP_VIDEO, feature_models.motion_extractor(self.models),
                                           out_dir / MOTION_FILE, batch_size=self.batch_size,
                                           device=feature_models._device(self.models), bf16=self.models.bf16)
        if motion.num_frames != crop_frames(inputs["crop"]):
            raise ClipRejected("corrupt", f"motion has {motion.num_frames} rows for {crop_frames(inputs['crop'])} frames")
        _save_npy(out_dir / STRUCT_FILE, to_struct(motion))
        return {"frames": motion.num_frames, "untrained_dryrun": motion.meta.get("untrained_dryrun", False)}


@dataclass
class PoseCheckStep:
    """Step 4: an independent head pose (FLAME when supplied, else landmarks + PnP) against LivePortrait's."""

    config: PoseCheckConfig = field(default_factory=PoseCheckConfig)
    flame_dir: Optional[str] = None  # <flame_dir>/<clip_id>.npz per clip (tasks/pose_check.py documents it)
    name: str = "pose_check"
    version: str = "2"  # 2: writes the aligned independent pose (head_pose_deg.npy) for the alignment loss
    requires: tuple[str, ...] = ("crop", "motion")

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.flame_dir)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        import numpy as np

        from models.struct_layout import load_motion
        from tasks.pose_check import check_clip_pose, load_flame_npz

        motion = load_motion(inputs["motion"] / MOTION_FILE)
        flame_file = Path(self.flame_dir) / f"{row.clip_id}.npz" if self.flame_dir else None
        flame = load_flame_npz(flame_file) if flame_file and flame_file.is_file() else None
        landmarks = np.load(inputs["crop"] / CROP_LANDMARKS, allow_pickle=False)
        result = check_clip_pose(motion, landmarks=landmarks, flame=flame, cfg=self.config)
        counts = {"dropped": result.dropped, "total": result.total, "drop_ratio": round(result.drop_ratio, 4),
                  "source": result.source, "offset_deg": round(float(result.offset_deg), 3)}
        if 1.0 - result.drop_ratio < self.config.min_keep_ratio:
            raise ClipRejected("pose_disagreement",
                               f"{result.dropped}/{result.total} frames differ by > {self.config.threshold_deg} deg "
                               f"({result.source})", info=counts)
        _save_npy(out_dir / KEEP_MASK_FILE, result.keep.astype(bool))
        _save_npy(out_dir / "pose_diff_deg.npy", result.diff_deg.astype(np.float32))
        _save_npy(out_dir / HEAD_POSE_FILE, result.aligned_deg.astype(np.float32))
        (out_dir / "pose.json").write_text(json.dumps(counts, sort_keys=True))
        return counts


@dataclass
class AudioFeaturesStep:
    """Step 5: HuBERT features pooled to 25 fps, exactly one row per video frame."""

    models: FeatureModels
    config: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)
    name: str = "audio_features"
    version: str = "2"  # 2: the last layer is the model's normalised output (HuBERT-large's final LayerNorm)
    requires: tuple[str, ...] = ("crop",)

    def fingerprint(self) -> str:
        return fingerprint(self.models.hubert, self.models.hubert_layers, self.config,
                           *feature_models.precision_tag(self.models))

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        from tasks.audio_features import audio_features_for_clip, require_usable

        T = crop_frames(inputs["crop"])
        result = audio_features_for_clip(inputs["crop"] / CROP_AUDIO, T, feature_models.hubert(self.models),
                                         self.config, feature_models._device(self.models), bf16=self.models.bf16)
        features = require_usable(result, self.config)
        _save_npy(out_dir / AUDIO_FEATURES_FILE, features)
        info = {"status": result.status, "audio_dim": int(features.shape[1]), "rms": round(result.rms, 6),
                "pad_samples": result.pad_samples, "untrained_dryrun": bool(result.meta.get("untrained_dryrun")),
                "hubert": result.meta.get("hubert"), "layers": result.meta.get("layers")}
        (out_dir / "audio_features.json").write_text(json.dumps(info, sort_keys=True))
        return info


@dataclass
class VaeLatentsStep:
    """Step 6: Wan VAE latents of every training window (4n+1 -> n+1 frames) and a reference latent."""

    models: FeatureModels
    windows: ShardConfig = field(default_factory=ShardConfig)
    crop_step: str = "crop"  # whose crop.mp4 it encodes: "crop" (the face crop) or "center_crop" (general profile)
    name: str = "vae_latents"
    version: str = "2"  # 2: windows inside the crop's stable segments

    @property
    def requires(self) -> tuple[str, ...]:
        # The upstream step's name is part of the cache key (step_runner.step_key), so the fingerprint need not
        # name it: a talking-head run's key is what it was before crop_step existed.
        return (self.crop_step,)

    def fingerprint(self) -> str:
        return fingerprint(self.models.wan_vae, self.models.wan_vae_subfolder, self.windows.window, self.windows.step)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        from tasks.media import iter_frames
        from tasks.vae_latents import VaeLatentConfig, encode_clip, save_vae_latents

        crop = inputs[self.crop_step]
        cfg = VaeLatentConfig(window_frames=self.windows.window, stride=self.windows.step)
        latents = encode_clip(iter_frames(crop / CROP_VIDEO, chunk=self.windows.window),
                              feature_models.wan_vae(self.models), cfg, segments=crop_segments(crop))
        save_vae_latents(out_dir / VAE_FILE, latents)
        info = {"windows": int(len(latents.window_starts)), "untrained_dryrun": bool(latents.meta.get("untrained_dryrun")),
                "vae": latents.meta.get("vae")}
        if self.models.wan_vae_subfolder:  # generation loads the same VAE (flows/preprocess.extractor_record)
            info["vae_subfolder"] = self.models.wan_vae_subfolder
        return info


@dataclass
class FlameStructStep:
    """Step 3 with the FLAME source (the 3D-latent gate's fallback): struct rows and keep mask from a FLAME
    tracker's file per clip (tasks/flame_struct.py), instead of LivePortrait's motion and the pose check."""

    flame_dir: str
    n_exp: int = 50  # tasks.flame_struct.DEFAULT_FLAME_EXPRESSION
    name: str = "flame_struct"
    version: str = "1"
    requires: tuple[str, ...] = ("crop",)

    def fingerprint(self) -> str:
        return fingerprint(self.n_exp)

    def row_fields(self, row: ClipRow) -> dict:
        # the tracker file is this step's input besides the crop: a re-fitted file is a different result
        from tasks.fetchers.cache import sha256_file
        from tasks.flame_struct import flame_file

        path = flame_file(self.flame_dir, row.clip_id)
        return {"flame_file": sha256_file(path) if path.is_file() else None}

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        from tasks.flame_struct import flame_file, flame_struct_for_clip, keep_ratio

        result = flame_struct_for_clip(flame_file(self.flame_dir, row.clip_id), crop_frames(inputs["crop"]), self.n_exp)
        _save_npy(out_dir / STRUCT_FILE, result.struct)
        _save_npy(out_dir / KEEP_MASK_FILE, result.valid)
        info = {"struct_dim": result.layout.dim, "n_exp": result.layout.n_exp, "keep_ratio": round(keep_ratio(result), 4),
                "shape": None if result.shape is None else [round(float(v), 6) for v in result.shape]}
        (out_dir / "flame.json").write_text(json.dumps(info, sort_keys=True))
        return info


SHARD_VERSION = "3"  # 3: windows hold their own frames (stride > decode chunk), inside the crop's segments
