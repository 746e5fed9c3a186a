"""DualForce model configuration: one dataclass, two named presets (`tiny` for CPU tests, `lite` ~1.5B)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from models.latent_geometry import LATENT_CHANNELS, VAE_TIME_STRIDE
from models.sample_shape import HUBERT_LARGE_DIM
from models.struct_layout import STRUCT_DIM

from .attention import ATTENTION_BACKENDS

BRIDGE_STRATEGIES = ("full", "shallow_focus", "none")


@dataclass
class DualForceConfig:
    """Sizes of the video DiT, the struct DiT, the bridge and the audio path.

    Video tokens: Wan-style patches (1,2,2) over VAE latents. Struct tokens: `struct_tokens_per_frame` per latent
    frame, made from the `frames_per_latent` struct rows of that latent frame (see frames.py).
    """

    name: str = "custom"
    # inputs (alignment contract)
    latent_channels: int = LATENT_CHANNELS
    mask_channels: int = 4  # Wan i2v: 4 mask channels (one per video frame packed into a latent frame)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    struct_dim: int = STRUCT_DIM
    audio_dim: int = HUBERT_LARGE_DIM  # the shards' HuBERT width (hubert-large; 768 for base)
    frames_per_latent: int = VAE_TIME_STRIDE
    # video DiT
    video_dim: int = 1536
    video_blocks: int = 20
    video_heads: int = 12
    video_ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep embedding width
    # struct DiT
    struct_model_dim: int = 1536
    struct_blocks: int = 10
    struct_heads: int = 12
    struct_ffn_dim: int = 8960
    struct_tokens_per_frame: int = 4  # = frames_per_latent: one token per struct row (struct_dit.py)
    # bridge (video <-> struct cross-attention)
    bridge_strategy: str = "shallow_focus"
    bridge_shallow_blocks: int = 8  # shallow_focus: bridge after the first N video blocks
    bridge_two_way: bool = True  # False: video reads struct only (the review's one-way bridge ablation)
    # audio conditioning
    audio_context_frames: int = 8  # past video frames seen by a latent frame's audio window (besides its own)
    audio_tokens_per_frame: int = 4
    # numerics
    qk_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    grad_checkpointing: bool = False
    # masked attention path (attention.py): "sdpa" dense boolean mask (the reference), "flex" FlexAttention BlockMask
    attention_backend: str = "sdpa"
    # the video DiT alone (no struct stream, bridge or audio path): video-only Diffusion Forcing pretraining
    # on general video; its weights are exactly the full model's video-DiT weights (models/dualforce/pretrained.py)
    video_only: bool = False
    # the lip-sync loss's projection head (aux_losses.LipSyncHead) width; 0: none (the loss needs one)
    lipsync_embed_dim: int = 0

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.bridge_strategy not in BRIDGE_STRATEGIES:
            raise ValueError(f"bridge_strategy must be one of {BRIDGE_STRATEGIES}, got {self.bridge_strategy!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.patch_size[0] != 1:
            raise ValueError(f"temporal patch must be 1 (frame-causal attention needs it), got {self.patch_size}")
        for dim_name, heads_name in (("video_dim", "video_heads"), ("struct_model_dim", "struct_heads")):
            dim, heads = getattr(self, dim_name), getattr(self, heads_name)
            if dim % heads:
                raise ValueError(f"{dim_name}={dim} is not divisible by {heads_name}={heads}")
            if (dim // heads) % 2 or dim // heads < 6:
                raise ValueError(f"head dim {dim // heads} ({dim_name}/{heads_name}) must be even and >= 6 for 3D RoPE")
        if not 1 <= self.struct_blocks <= self.video_blocks:
            raise ValueError(
                f"struct_blocks must be in [1, video_blocks={self.video_blocks}], got {self.struct_blocks}"
            )
        if self.bridge_strategy == "shallow_focus" and not 1 <= self.bridge_shallow_blocks <= self.video_blocks:
            raise ValueError(
                f"bridge_shallow_blocks must be in [1, {self.video_blocks}], got {self.bridge_shallow_blocks}"
            )
        if self.struct_tokens_per_frame < 1 or self.audio_tokens_per_frame < 1:
            raise ValueError("struct_tokens_per_frame and audio_tokens_per_frame must be >= 1")
        if self.audio_context_frames < 0:
            raise ValueError(f"audio_context_frames must be >= 0, got {self.audio_context_frames}")

    @property
    def in_channels(self) -> int:
        """Video DiT input: noisy latent + mask + reference latent (36 for Wan i2v)."""
        return 2 * self.latent_channels + self.mask_channels

    @property
    def audio_window(self) -> int:
        """Video frames of audio features one latent frame sees: its own group of 4 plus the past context."""
        return self.frames_per_latent + self.audio_context_frames

    def bridge_blocks(self) -> tuple[int, ...]:
        """Video block indices after which a bridge layer runs."""
        if self.bridge_strategy == "full":
            return tuple(range(self.video_blocks))
        if self.bridge_strategy == "shallow_focus":
            return tuple(range(self.bridge_shallow_blocks))
        return ()

    def struct_schedule(self) -> tuple[int, ...]:
        """For each struct block, the video block after which it runs (spread evenly over the video depth)."""
        return tuple(j * self.video_blocks // self.struct_blocks for j in range(self.struct_blocks))


_PRESETS: dict[str, dict] = {
    # tiny: the smallest model that can still learn: video width >= a (1,2,2) patch's 64 latent values, struct
    # width >= a struct row's 133, one token per row (measured: one batch, fresh noise, 1,200 AdamW steps at 1e-3,
    # loss 10.3x lower; 3.0x for the 48/36-wide, 2-token tiny before)
    "tiny": dict(
        video_dim=64, video_blocks=3, video_heads=2, video_ffn_dim=128, freq_dim=32,
        struct_model_dim=144, struct_blocks=2, struct_heads=2, struct_ffn_dim=288, struct_tokens_per_frame=4,
        bridge_strategy="shallow_focus", bridge_shallow_blocks=2,
        audio_dim=32, audio_context_frames=4, audio_tokens_per_frame=2,
    ),
    "lite": dict(
        video_dim=1536, video_blocks=20, video_heads=12, video_ffn_dim=8960, freq_dim=256,
        struct_model_dim=1536, struct_blocks=10, struct_heads=12, struct_ffn_dim=6144, struct_tokens_per_frame=4,
        bridge_strategy="shallow_focus", bridge_shallow_blocks=8,
        audio_dim=1024, audio_context_frames=8, audio_tokens_per_frame=4,
    ),
}

CONFIG_NAMES = tuple(_PRESETS)


def get_config(name: str, **overrides) -> DualForceConfig:
    """A named preset with optional field overrides (unknown fields are an error)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown DualForce config {name!r}; known: {', '.join(CONFIG_NAMES)}")
    known = {f.name for f in fields(DualForceConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown DualForceConfig field(s): {', '.join(unknown)}")
    return DualForceConfig(**{**_PRESETS[name], "name": name, **overrides})
