"""DualForce: causal video DiT + struct DiT, joined by a frame-causal bridge, conditioned on audio and a reference.

Block order: for each video block i, run it, then the struct blocks scheduled after it (config.struct_schedule,
spread evenly over the video depth), then the bridge if i is a bridge block (config.bridge_blocks). Everything is
per latent frame and frame-causal, so running frames [a, b) with a KV cache of clean frames [0, a) equals running
frames [0, b) in one pass and slicing.

Conditioning: the reference latent has its own tokens at frame -1, prepended to the video stream, visible to every
frame and cached once (video_dit.py); frames really given (context) are marked by the mask channels. The
cross-attention of every block attends to the frame's own audio tokens (audio.py; their windows already hold past
audio); audio also drives a zero-initialised AdaLN branch. There is no text encoder. Struct rows are expected
normalised upstream. Residual streams, modulation and gated adds are float32 (modulation.py).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .audio import AudioProjector
from .aux_losses import LipSyncHead, mouth_columns
from .block import DiTBlock
from .bridge import Bridge
from .config import DualForceConfig, get_config
from .frames import audio_windows
from .kv_cache import KVCache
from .masking import REFERENCE_FRAME, frame_causal_mask
from .modulation import AudioModulation, TimestepEmbedding
from .rope import grid_positions, rope_angles
from .serialization import WEIGHTS_FILE, read_pretrained_config, weights_header, write_pretrained
from .struct_dit import StructEmbed, StructHead
from .video_dit import ReferenceEmbed, VideoHead, VideoPatchEmbed, given_condition


class DualForce(nn.Module):
    def __init__(self, config: DualForceConfig):
        super().__init__()
        self.config = c = config
        self.provenance: dict = {}  # where an exported model's weights came from (from_pretrained fills it)
        G = c.frames_per_latent
        audio_token_dim = None if c.video_only else c.video_dim
        # video stream
        self.video_embed = VideoPatchEmbed(c.in_channels, c.video_dim, c.patch_size)
        self.reference_embed = ReferenceEmbed(c.video_dim, c.mask_channels)
        self.video_time = TimestepEmbedding(c.freq_dim, c.video_dim)
        self.video_blocks = nn.ModuleList(
            DiTBlock(c.video_dim, c.video_heads, c.video_ffn_dim, audio_token_dim, c.qk_norm, c.eps, c.attention_backend)
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
            DiTBlock(c.struct_model_dim, c.struct_heads, c.struct_ffn_dim, c.video_dim, c.qk_norm, c.eps,
                     c.attention_backend)
            for _ in range(c.struct_blocks)
        )
        self.struct_head = StructHead(G, c.struct_dim, c.struct_tokens_per_frame, c.struct_model_dim, c.eps)
        # audio + bridge
        self.audio = AudioProjector(c.audio_dim, c.audio_window, c.audio_tokens_per_frame, c.video_dim, c.eps)
        self.bridges = nn.ModuleDict(
            {str(i): Bridge(c.video_dim, c.video_heads, c.struct_model_dim, c.struct_heads, c.qk_norm, c.eps,
                           two_way=c.bridge_two_way, backend=c.attention_backend)
             for i in c.bridge_blocks()}
        )
        for j, i in enumerate(c.struct_schedule()):
            self._struct_after.setdefault(i, []).append(j)
        self.lipsync_head = None
        if c.lipsync_embed_dim > 0:  # only the lip-sync loss uses it; generation never does
            self.lipsync_head = LipSyncHead(c.audio_window, c.audio_dim, G * len(mouth_columns(c.struct_dim)),
                                            c.lipsync_embed_dim, c.eps)
        self._init_weights()

    @classmethod
    def from_pretrained(cls, path, device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = None) -> "DualForce":
        """A model from an exported folder (serialization.py); every weight must be there, nothing else may be."""
        from safetensors.torch import load_file

        from models.weights import WeightsError, check_state_dict

        config, provenance = read_pretrained_config(path)
        weights_file = Path(path) / WEIGHTS_FILE
        header = weights_header(weights_file)  # before anything is built: a config past the file's tensors is refused
        try:
            with torch.device("meta"):  # no memory: an absurd config fails here or at the shape check, not in malloc
                model = cls(config)
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise WeightsError(f"{Path(path) / 'config.json'} describes a model that cannot be built: {exc}") from None
        check_state_dict(model, header, str(weights_file))  # every missing / extra / misshapen tensor, at once
        state = load_file(str(weights_file))
        # fresh (aligned) storage, not the file's mapping: the same kernels, so bit-identical outputs
        model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
        model.provenance = provenance
        return model.to(device=device, dtype=dtype).eval()

    def set_attention_backend(self, backend: str) -> "DualForce":
        """Switch every masked attention between "sdpa" and "flex" (same weights, same result; attention.py)."""
        self.config = replace(self.config, attention_backend=backend)  # validates the name
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend
        return self

    def save_pretrained(self, path, provenance: Optional[dict] = None):
        """Export config.json + model.safetensors (+ provenance.json), atomically."""
        return write_pretrained(path, self.config, self.state_dict(), provenance)

    def _init_weights(self) -> None:
        """Xavier for the linear layers, then zero again for everything that starts at zero (AdaLN-Zero tables and
        projections, output heads, audio and bridge gates): the model starts as "predict velocity 0"."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.video_embed.proj.weight.flatten(1))
        with torch.no_grad():
            for p in self.zero_init_parameters().values():
                p.zero_()

    def zero_init_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that start at zero: the timestep and audio AdaLN projections and per-block tables
        (AdaLN-Zero: blocks start as the identity), the output heads, the reference embedding, the audio and bridge
        gates."""
        heads = ("video_head.proj.", "struct_head.proj.")
        adaln = ("video_time.proj.", "struct_time.proj.", "video_audio_mod.", "struct_audio_mod.")
        names = {}
        for name, p in self.named_parameters():
            block_table = name.startswith(("video_blocks.", "struct_blocks.")) and name.endswith(".modulation")
            gate = name.endswith("audio_gate") or name.startswith("bridges.") and name.endswith("_gate")
            if block_table or gate or name.startswith(heads + adaln) or name == "reference_embed.embed":
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
        reference_latent: Optional[torch.Tensor],  # [B, 16, 1, h, w]; None when the cache already holds it
        audio_windows: Optional[torch.Tensor],  # [B, n, W, A] (self.audio_windows of the whole clip, sliced)
        frame_offset: int = 0,
        cache: Optional[KVCache] = None,
        update_cache: bool = False,
        given: Optional[torch.Tensor] = None,  # [B, n] bool: frames really given (clean, sigma 0), mask channels 1
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Velocity predictions (video [B, 16, n, h, w], struct [B, n, G, S] or None for the video-only model)
        for latent frames offset..offset+n."""
        c = self.config
        if c.video_only:
            if noisy_struct is not None or audio_windows is not None:
                raise ValueError("a video-only DualForce takes no struct rows and no audio")
            self._check_video(noisy_video, sigma_video, reference_latent, cache)
        else:
            self._check_inputs(noisy_video, sigma_video, noisy_struct, sigma_struct, reference_latent, audio_windows,
                               cache)
        self._check_cache(cache, frame_offset)
        device = noisy_video.device
        B, _, n, h, w = noisy_video.shape
        hp, wp = h // c.patch_size[1], w // c.patch_size[2]
        frames = torch.arange(frame_offset, frame_offset + n)  # absolute frame ids, on the CPU
        xv = self.video_embed(torch.cat([noisy_video, given_condition(noisy_video, given, c.mask_channels)], 1)).float()
        ev, mod_v = self.video_time(sigma_video)  # [B, n, Dv], [B, n, 6, Dv]
        Nv = xv.shape[2]
        audio_tokens = None
        if not c.video_only:
            audio_tokens, audio_vec = self.audio(audio_windows)  # [B, n, Na, Dv], [B, n, Dv]
            mod_v = mod_v + self.video_audio_mod(audio_vec)
        # the reference frame leads the video stream unless the cache holds it
        r = 0 if reference_latent is None else 1
        if r:
            xv = torch.cat([self.reference_embed(self.video_embed, reference_latent), xv], dim=1)
            mod_v = torch.cat([self._reference_modulation(B, device), mod_v], dim=1)
        video_frames = torch.cat([torch.tensor([REFERENCE_FRAME] * r, dtype=frames.dtype), frames])
        v_frames = video_frames.repeat_interleave(Nv)
        v_rope = self._video_rope(video_frames, hp, wp, device)
        if cache is not None:
            cache.recording = update_cache
        v_mask = frame_causal_mask(v_frames, self._keys(cache, "video", v_frames), device)
        block = lambda blk, x, m, a, rope, mask, name: blk(x, m, a, rope, mask, cache, name)  # noqa: E731

        xs = struct_setup = None
        if not c.video_only:
            xs = self.struct_embed(noisy_struct)  # [B, n, Ns, Ds] float32
            es, mod_s = self.struct_time(sigma_struct)
            mod_s = mod_s + self.struct_audio_mod(audio_vec)
            struct_setup = self._struct_attention_setup(frames, Nv, xs.shape[2], cache, device)

        run = self._block_runner(cache)
        for i, vblock in enumerate(self.video_blocks):
            xv = run(lambda x, blk=vblock, i=i: block(blk, x, mod_v, audio_tokens, v_rope, v_mask, f"video:{i}"), xv)
            if xs is None:
                continue
            s_rope, s_mask, bridge_ropes, bridge_masks = struct_setup
            for j in self._struct_after.get(i, ()):
                sblock = self.struct_blocks[j]
                xs = run(lambda x, blk=sblock, j=j: block(blk, x, mod_s, audio_tokens, s_rope, s_mask, f"struct:{j}"), xs)
            if str(i) in self.bridges:  # the bridge joins the real frames; the reference frame stays out
                bridge = self.bridges[str(i)]
                x_frames, xs = run(
                    lambda a, b, br=bridge, i=i: br(a, b, bridge_ropes, bridge_masks, cache, f"bridge{i}"), xv[:, r:], xs
                )
                xv = torch.cat([xv[:, :r], x_frames], dim=1) if r else x_frames
        _close(cache, update_cache)
        video_v = self.video_head(xv[:, r:], ev, (hp, wp))
        return video_v, (None if xs is None else self.struct_head(xs, es))

    @torch.no_grad()
    def cache_reference(self, reference_latent: torch.Tensor, cache: KVCache) -> None:
        """Write the reference frame's keys/values into `cache` (once, before any frame): later passes with this
        cache take reference_latent=None and attend to the cached reference. The reference's tokens see only
        themselves and pass the video blocks without audio, struct or bridge, so this equals prepending it."""
        if cache.has_reference or cache.num_frames:
            raise ValueError("cache_reference goes first, into an empty cache")
        c = self.config
        _, _, _, h, w = reference_latent.shape
        device = reference_latent.device
        x = self.reference_embed(self.video_embed, reference_latent)  # [B, 1, Nv, Dv]
        mods = self._reference_modulation(reference_latent.shape[0], device)
        ref_frames = torch.tensor([REFERENCE_FRAME])
        rope = self._video_rope(ref_frames, h // c.patch_size[1], w // c.patch_size[2], device)
        cache.recording = True
        cache.key_frames("video", ref_frames.repeat_interleave(x.shape[2]))
        for i, blk in enumerate(self.video_blocks):
            x = blk(x, mods, None, rope, None, cache, f"video:{i}")
        cache.commit()

    def _reference_modulation(self, batch: int, device) -> torch.Tensor:
        """[B, 1, 6, Dv]: the reference is a clean frame (sigma 0) and has no audio."""
        return self.video_time(torch.zeros(batch, 1, device=device))[1]

    def _struct_attention_setup(self, frames: torch.Tensor, Nv: int, Ns: int, cache: Optional[KVCache], device):
        """RoPE angles and frame-causal masks of the struct blocks and the bridges (real frames only)."""
        c = self.config
        v_frames, s_frames = frames.repeat_interleave(Nv), frames.repeat_interleave(Ns)
        dv_head, ds_head = c.video_dim // c.video_heads, c.struct_model_dim // c.struct_heads
        to_dev = lambda r: (r[0].to(device), r[1].to(device))  # noqa: E731
        s_rope = to_dev(rope_angles(grid_positions(frames, Ns, 1), ds_head, c.rope_theta))
        t_only = lambda fr, d: to_dev(rope_angles(torch.stack([fr, 0 * fr, 0 * fr], -1), d, c.rope_theta))  # noqa: E731
        bridge_ropes = {
            "v_in_v": t_only(v_frames, dv_head), "s_in_v": t_only(s_frames, dv_head),
            "s_in_s": t_only(s_frames, ds_head), "v_in_s": t_only(v_frames, ds_head),
        }
        s_keys = self._keys(cache, "struct", s_frames)
        bv_keys = self._keys(cache, "bridge_video", v_frames)  # the bridge's video keys: real frames only
        s_mask = frame_causal_mask(s_frames, s_keys, device)
        bridge_masks = {"s2v": frame_causal_mask(v_frames, s_keys, device),
                        "v2s": frame_causal_mask(s_frames, bv_keys, device)}
        return s_rope, s_mask, bridge_ropes, bridge_masks

    @staticmethod
    def _keys(cache: Optional[KVCache], stream: str, current: torch.Tensor) -> torch.Tensor:
        return current if cache is None else cache.key_frames(stream, current)

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

    def _check_video(self, noisy_video, sigma_video, reference_latent, cache: Optional[KVCache]) -> None:
        c = self.config
        if noisy_video.ndim != 5 or noisy_video.shape[1] != c.latent_channels:
            raise ValueError(f"noisy_video must be [B, {c.latent_channels}, L, h, w], got {tuple(noisy_video.shape)}")
        B, _, n, h, w = noisy_video.shape
        cached = cache is not None and cache.has_reference
        if cached and reference_latent is not None:
            raise ValueError("the cache already holds the reference: pass reference_latent=None")
        if not cached and reference_latent is None:
            raise ValueError("reference_latent is required (or cache it first with cache_reference)")
        expect = [("sigma_video", sigma_video, (B, n))]
        if reference_latent is not None:
            expect.append(("reference_latent", reference_latent, (B, c.latent_channels, 1, h, w)))
        for name, t, shape in expect:
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")

    def _check_inputs(self, noisy_video, sigma_video, noisy_struct, sigma_struct, reference_latent, audio_windows,
                      cache) -> None:
        c = self.config
        self._check_video(noisy_video, sigma_video, reference_latent, cache)
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
