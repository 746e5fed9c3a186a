"""DualForce: causal video DiT + struct DiT, joined by a frame-causal bridge, conditioned on audio and a reference.

Block order: for each video block i, run it, then the struct blocks scheduled after it (config.struct_schedule,
spread evenly over the video depth), then the bridge if i is a bridge block (config.bridge_blocks). Everything is
per latent frame and frame-causal, so running frames [a, b) with a KV cache of clean frames [0, a) equals running
frames [0, b) in one pass and slicing.

Conditioning: the reference latent enters as Wan i2v channels at latent frame 0 (video_dit.py); the cross-attention
of every block attends to the frame's own audio tokens (audio.py; their windows already hold past audio); audio
also drives a zero-initialised AdaLN branch. There is no text encoder. Struct rows are expected normalised upstream.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import KVCache, frame_causal_mask
from .audio import AudioProjector
from .block import DiTBlock
from .bridge import Bridge
from .config import DualForceConfig, get_config
from .frames import audio_windows
from .modulation import AudioModulation, TimestepEmbedding
from .rope import grid_positions, rope_angles
from .struct_dit import StructEmbed, StructHead
from .video_dit import VideoHead, VideoPatchEmbed, reference_condition


class DualForce(nn.Module):
    def __init__(self, config: DualForceConfig):
        super().__init__()
        self.config = c = config
        G = c.frames_per_latent
        audio_token_dim = None if c.video_only else c.video_dim
        # video stream
        self.video_embed = VideoPatchEmbed(c.in_channels, c.video_dim, c.patch_size)
        self.video_time = TimestepEmbedding(c.freq_dim, c.video_dim)
        self.video_blocks = nn.ModuleList(
            DiTBlock(c.video_dim, c.video_heads, c.video_ffn_dim, audio_token_dim, c.qk_norm, c.eps)
            for _ in range(c.video_blocks)
        )
        self.video_head = VideoHead(c.video_dim, c.latent_channels, c.patch_size, c.eps)
        self._struct_after: dict[int, list[int]] = {}
        if c.video_only:  # the video DiT alone: nothing below exists
            self._init_weights()
            return
        self.video_audio_mod = AudioModulation(c.video_dim, c.video_dim)
        # struct stream
        self.struct_embed = StructEmbed(G, c.struct_dim, c.struct_tokens_per_frame, c.struct_model_dim)
        self.struct_time = TimestepEmbedding(c.freq_dim, c.struct_model_dim)
        self.struct_audio_mod = AudioModulation(c.video_dim, c.struct_model_dim)
        self.struct_blocks = nn.ModuleList(
            DiTBlock(c.struct_model_dim, c.struct_heads, c.struct_ffn_dim, c.video_dim, c.qk_norm, c.eps)
            for _ in range(c.struct_blocks)
        )
        self.struct_head = StructHead(G, c.struct_dim, c.struct_tokens_per_frame, c.struct_model_dim, c.eps)
        # audio + bridge
        self.audio = AudioProjector(c.audio_dim, c.audio_window, c.audio_tokens_per_frame, c.video_dim, c.eps)
        self.bridges = nn.ModuleDict(
            {str(i): Bridge(c.video_dim, c.video_heads, c.struct_model_dim, c.struct_heads, c.qk_norm, c.eps) for i in c.bridge_blocks()}
        )
        for j, i in enumerate(c.struct_schedule()):
            self._struct_after.setdefault(i, []).append(j)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.video_embed.proj.weight.flatten(1))
        if self.config.video_only:
            return
        for mod in (self.video_audio_mod, self.struct_audio_mod):  # AdaLN-Zero audio branch
            nn.init.zeros_(mod.proj[1].weight)

    def zero_init_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that start at zero so the audio and bridge paths are no-ops at init."""
        names = {}
        for name, p in self.named_parameters():
            if name.endswith("audio_gate") or name.startswith("bridges.") and name.endswith("_gate"):
                names[name] = p
            elif name.startswith(("video_audio_mod.", "struct_audio_mod.")):
                names[name] = p
        return names

    def audio_windows(self, audio_features: torch.Tensor) -> torch.Tensor:
        """[B, T, A] per video frame -> [B, L, W, A] causal windows (frames.audio_windows)."""
        if self.config.video_only:
            raise ValueError("a video-only DualForce has no audio path")
        return audio_windows(audio_features, self.config.audio_context_frames, self.config.frames_per_latent)

    def forward(
        self,
        noisy_video: torch.Tensor,  # [B, 16, n, h, w] latent frames offset..offset+n
        sigma_video: torch.Tensor,  # [B, n] per-frame noise level in [0, 1]
        noisy_struct: Optional[torch.Tensor],  # [B, n, G, S] grouped struct rows (None: video-only model)
        sigma_struct: Optional[torch.Tensor],  # [B, n]
        reference_latent: torch.Tensor,  # [B, 16, 1, h, w]
        audio_windows: Optional[torch.Tensor],  # [B, n, W, A] (self.audio_windows of the whole clip, sliced)
        frame_offset: int = 0,
        cache: Optional[KVCache] = None,
        update_cache: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Velocity predictions (video [B, 16, n, h, w], struct [B, n, G, S] or None for the video-only model)
        for latent frames offset..offset+n."""
        c = self.config
        if c.video_only:
            return self._forward_video_only(noisy_video, sigma_video, noisy_struct, reference_latent, audio_windows,
                                            frame_offset, cache, update_cache)
        self._check_inputs(noisy_video, sigma_video, noisy_struct, sigma_struct, reference_latent, audio_windows)
        self._check_cache(cache, frame_offset)
        device = noisy_video.device
        xv, ev, mod_v, frames, (hp, wp) = self._embed_video(noisy_video, sigma_video, reference_latent, frame_offset)
        xs = self.struct_embed(noisy_struct.to(xv.dtype))  # [B, n, Ns, Ds]
        audio_tokens, audio_vec = self.audio(audio_windows)  # [B, n, Na, Dv], [B, n, Dv]
        mod_v = mod_v + self.video_audio_mod(audio_vec)
        es, mod_s = self.struct_time(sigma_struct)
        mod_s = mod_s + self.struct_audio_mod(audio_vec)

        Nv, Ns = xv.shape[2], xs.shape[2]
        v_frames, s_frames = frames.repeat_interleave(Nv), frames.repeat_interleave(Ns)
        dv_head, ds_head = c.video_dim // c.video_heads, c.struct_model_dim // c.struct_heads
        to_dev = lambda r: (r[0].to(device), r[1].to(device))  # noqa: E731
        v_rope = self._video_rope(frames, hp, wp, device)
        s_rope = to_dev(rope_angles(grid_positions(frames, Ns, 1), ds_head, c.rope_theta))
        t_only = lambda fr, d: to_dev(rope_angles(torch.stack([fr, 0 * fr, 0 * fr], -1), d, c.rope_theta))  # noqa: E731
        bridge_ropes = {
            "v_in_v": t_only(v_frames, dv_head), "s_in_v": t_only(s_frames, dv_head),
            "s_in_s": t_only(s_frames, ds_head), "v_in_s": t_only(v_frames, ds_head),
        }
        if cache is not None:
            cache.recording = update_cache
            v_keys, s_keys = cache.key_frames("video", v_frames), cache.key_frames("struct", s_frames)
        else:
            v_keys, s_keys = v_frames, s_frames
        v_mask, s_mask = frame_causal_mask(v_frames, v_keys, device), frame_causal_mask(s_frames, s_keys, device)
        bridge_masks = {
            "s2v": frame_causal_mask(v_frames, s_keys, device), "v2s": frame_causal_mask(s_frames, v_keys, device)
        }

        run = self._block_runner(cache)
        for i, vblock in enumerate(self.video_blocks):
            xv = run(lambda x, blk=vblock, i=i: blk(x, mod_v, audio_tokens, v_rope, v_mask, cache, f"video{i}"), xv)
            for j in self._struct_after.get(i, ()):
                sblock = self.struct_blocks[j]
                xs = run(lambda x, blk=sblock, j=j: blk(x, mod_s, audio_tokens, s_rope, s_mask, cache, f"struct{j}"), xs)
            if str(i) in self.bridges:
                bridge = self.bridges[str(i)]
                xv, xs = run(
                    lambda a, b, br=bridge, i=i: br(a, b, bridge_ropes, bridge_masks, cache, f"bridge{i}"), xv, xs
                )
        _close(cache, update_cache)
        video_v = self.video_head(xv, ev, (hp, wp))
        struct_v = self.struct_head(xs, es)
        return video_v, struct_v

    def _forward_video_only(self, noisy_video, sigma_video, noisy_struct, reference_latent, audio_windows,
                            frame_offset, cache, update_cache) -> tuple[torch.Tensor, None]:
        """The video DiT alone: the same embedding, blocks (without their audio path) and head as the full model."""
        if noisy_struct is not None or audio_windows is not None:
            raise ValueError("a video-only DualForce takes no struct rows and no audio")
        self._check_video(noisy_video, sigma_video, reference_latent)
        self._check_cache(cache, frame_offset)
        device = noisy_video.device
        xv, ev, mod_v, frames, (hp, wp) = self._embed_video(noisy_video, sigma_video, reference_latent, frame_offset)
        v_frames = frames.repeat_interleave(xv.shape[2])
        v_rope = self._video_rope(frames, hp, wp, device)
        if cache is not None:
            cache.recording = update_cache
        v_keys = cache.key_frames("video", v_frames) if cache is not None else v_frames
        v_mask = frame_causal_mask(v_frames, v_keys, device)
        run = self._block_runner(cache)
        for i, vblock in enumerate(self.video_blocks):
            xv = run(lambda x, blk=vblock, i=i: blk(x, mod_v, None, v_rope, v_mask, cache, f"video{i}"), xv)
        _close(cache, update_cache)
        return self.video_head(xv, ev, (hp, wp)), None

    def _embed_video(self, noisy_video, sigma_video, reference_latent, frame_offset: int):
        """The video stream's input side, the same for the full and the video-only model: tokens [B, n, Nv, Dv]
        (noisy latent + reference condition, patched), frame embedding [B, n, Dv], timestep modulation
        [B, n, 6, Dv], the absolute frame ids and the patch grid (hp, wp). Frame ids are built on the CPU."""
        c = self.config
        _, _, n, h, w = noisy_video.shape
        frames = torch.arange(frame_offset, frame_offset + n)
        cond = reference_condition(reference_latent, n, frame_offset, c.mask_channels)
        xv = self.video_embed(torch.cat([noisy_video, cond], dim=1).to(self.video_embed.proj.weight.dtype))
        ev, mod_v = self.video_time(sigma_video)
        return xv, ev, mod_v, frames, (h // c.patch_size[1], w // c.patch_size[2])

    def _video_rope(self, frames: torch.Tensor, hp: int, wp: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """3D RoPE angles of the video tokens (built on the CPU, then moved: small, no device sync)."""
        c = self.config
        cos, sin = rope_angles(grid_positions(frames, hp, wp), c.video_dim // c.video_heads, c.rope_theta)
        return cos.to(device), sin.to(device)

    def _block_runner(self, cache: Optional[KVCache]):
        """Blocks through activation checkpointing when training with grad_checkpointing, else called plainly."""
        c = self.config
        if c.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
            return lambda f, *a: checkpoint(f, *a, use_reentrant=False)
        return lambda f, *a: f(*a)

    @staticmethod
    def _check_cache(cache: Optional[KVCache], frame_offset: int) -> None:
        if cache is not None and cache.num_frames != frame_offset:
            raise ValueError(f"cache holds {cache.num_frames} frames but frame_offset is {frame_offset}")

    def _check_video(self, noisy_video, sigma_video, reference_latent) -> None:
        c = self.config
        if noisy_video.ndim != 5 or noisy_video.shape[1] != c.latent_channels:
            raise ValueError(f"noisy_video must be [B, {c.latent_channels}, L, h, w], got {tuple(noisy_video.shape)}")
        B, _, n, h, w = noisy_video.shape
        for name, t, shape in (("sigma_video", sigma_video, (B, n)),
                               ("reference_latent", reference_latent, (B, c.latent_channels, 1, h, w))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")

    def _check_inputs(self, noisy_video, sigma_video, noisy_struct, sigma_struct, reference_latent, audio_windows) -> None:
        c = self.config
        self._check_video(noisy_video, sigma_video, reference_latent)
        B, _, n, h, w = noisy_video.shape
        expect = {
            "sigma_struct": (sigma_struct, (B, n)),
            "noisy_struct": (noisy_struct, (B, n, c.frames_per_latent, c.struct_dim)),
            "audio_windows": (audio_windows, (B, n, c.audio_window, c.audio_dim)),
        }
        for name, (t, shape) in expect.items():
            if t is None:
                raise ValueError(f"{name} is required by the full DualForce model (video_only=False)")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _close(cache: Optional[KVCache], update_cache: bool) -> None:
    """After a pass: the clean frames it staged join the cache, or the staged keys/values are dropped."""
    if cache is not None:
        cache.commit() if update_cache else cache.discard()


def build_model(name_or_config: Union[str, DualForceConfig], **overrides) -> DualForce:
    """A DualForce model from a preset name (with field overrides) or a config."""
    if isinstance(name_or_config, DualForceConfig):
        if overrides:
            name_or_config = replace(name_or_config, **overrides)
        return DualForce(name_or_config)
    return DualForce(get_config(name_or_config, **overrides))
