"""Wan 2.1 VAE (diffusers AutoencoderKLWan) from a local directory or the HF cache, and a streaming encoder.

diffusers' `AutoencoderKLWan._encode` is already causal and chunked in time: it runs the encoder on frame 0,
then on groups of 4 frames, carrying a feature cache (the last 2 frames of every causal conv) between calls.
But it takes the whole video tensor at once. `CausalStreamEncoder` drives the same encoder, the same cache
and the same grouping one group at a time, so a clip of any length is encoded with memory bounded by one
group of frames; the result equals `vae.encode(video).latent_dist.mean` (tested). Several equal-length clips
(a clip's training windows) go through it as one batch, [B, n, H, W, 3], to fill a GPU. Spatial tiling is not
needed at 512x512 and is not used. The VAE runs in float32 on every device: the precision diffusers' Wan
pipelines load it in (`torch_dtype=torch.float32`), i.e. what its users trained their latents with.

Latents are the posterior mean, normalised with the config's per-channel statistics:
z = (mean - latents_mean) / latents_std (the Wan pipelines' convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.weights import HF_DRYRUN_MARKER, WeightsError, check_loading_info

TIME_STRIDE = 4


@dataclass
class WanVae:
    vae: torch.nn.Module  # diffusers AutoencoderKLWan
    latents_mean: torch.Tensor  # [C]
    latents_std: torch.Tensor  # [C]
    source: str
    untrained_dryrun: bool = False

    @property
    def z_dim(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def normalise(self, mean: torch.Tensor) -> torch.Tensor:
        """[B, C, t, h, w] posterior mean -> normalised latent."""
        m = self.latents_mean.to(mean)[None, :, None, None, None]
        s = self.latents_std.to(mean)[None, :, None, None, None]
        return (mean - m) / s

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latent [B, C, t, h, w] -> the posterior mean the decoder takes (normalise's inverse)."""
        m = self.latents_mean.to(latents)[None, :, None, None, None]
        s = self.latents_std.to(latents)[None, :, None, None, None]
        return latents * s + m


def load_wan_vae(
    name_or_dir: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVae:
    """AutoencoderKLWan from a `save_pretrained` dir (or a pipeline dir with subfolder="vae"), or a cached repo id.

    local_files_only=True: nothing is downloaded; a missing model raises WeightsError naming what was looked for.
    """
    from diffusers import AutoencoderKLWan

    local = Path(name_or_dir)
    if not local.is_dir() and (local.is_absolute() or str(name_or_dir).startswith(".")):
        raise WeightsError(f"Wan VAE directory not found: {local}")
    try:
        vae, info = AutoencoderKLWan.from_pretrained(str(name_or_dir), subfolder=subfolder, local_files_only=True,
                                                     torch_dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, EnvironmentError, RuntimeError) as exc:
        where = f"directory {local}" if local.is_dir() else f"'{name_or_dir}' in the Hugging Face cache"
        raise WeightsError(f"cannot load the Wan VAE from {where} (subfolder={subfolder!r}, local_files_only, "
                           f"nothing downloaded): {exc}") from exc
    check_loading_info(info, f"{name_or_dir}{'/' + subfolder if subfolder else ''}", "AutoencoderKLWan")
    if vae.config.patch_size is not None:
        raise WeightsError(f"{name_or_dir}: patchified VAEs (Wan 2.2, patch_size={vae.config.patch_size}) are not supported")
    mean, std = vae.config.latents_mean, vae.config.latents_std
    if len(mean) != vae.config.z_dim or len(std) != vae.config.z_dim:
        raise WeightsError(f"{name_or_dir}: latents_mean/std must have z_dim={vae.config.z_dim} values")
    model_dir = local / subfolder if (local.is_dir() and subfolder) else local
    return WanVae(
        vae=vae.to(device).eval(),
        latents_mean=torch.tensor(mean, dtype=torch.float32),
        latents_std=torch.tensor(std, dtype=torch.float32),
        source=str(name_or_dir),
        untrained_dryrun=(model_dir / HF_DRYRUN_MARKER).is_file(),
    )


def frames_to_input(frames_uint8: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [t, H, W, 3] (or a batch [B, t, H, W, 3]) -> [B, 3, t, H, W] in [-1, 1]."""
    if frames_uint8.ndim == 4:
        frames_uint8 = frames_uint8[None]
    if frames_uint8.dtype != np.uint8 or frames_uint8.ndim != 5 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [t, H, W, 3] or [B, t, H, W, 3], got {frames_uint8.dtype} "
                         f"{frames_uint8.shape}")
    x = torch.from_numpy(np.array(frames_uint8, copy=True)).to(device)  # decoded frames may be read-only
    return x.permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0


def output_to_frames(video: torch.Tensor) -> np.ndarray:
    """[B, 3, t, H, W] in [-1, 1] -> uint8 [B, t, H, W, 3] (frames_to_input's inverse, rounded)."""
    x = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.permute(0, 2, 3, 4, 1).to(torch.uint8).cpu().numpy()


class CausalStreamEncoder:
    """Feed frames in any chunking; get normalised latents, one per (1 then 4) frames, as diffusers would.

    Only one stream per VAE at a time (it uses the VAE's encoder cache).
    """

    def __init__(self, wan: WanVae):
        self.wan = wan
        self.vae = wan.vae
        self.vae.clear_cache()
        self._pending: list[np.ndarray] = []
        self._count = 0
        self._started = False
        self.frames_in = 0
        self.frames_encoded = 0

    @torch.inference_mode()
    def _encode_group(self, frames: np.ndarray) -> torch.Tensor:
        vae = self.vae
        x = frames_to_input(frames, self.wan.device, self.wan.dtype)
        vae._enc_conv_idx = [0]
        out = vae.encoder(x, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx)
        mean = vae.quant_conv(out)[:, : self.wan.z_dim]  # quant_conv is 1x1x1: per-group == on the whole
        self.frames_encoded += frames.shape[1]
        return self.wan.normalise(mean.float())  # [B, C, 1, h, w]

    def push(self, frames: np.ndarray) -> list[torch.Tensor]:
        """Add frames [n, H, W, 3] uint8 (or B streams at once, [B, n, H, W, 3]); returns the latent frames
        completed by them (each [B, C, 1, h, w], B = 1 for unbatched frames)."""
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim == 4:
            frames = frames[None]
        n = frames.shape[1]
        self.frames_in += n
        self._pending.append(frames)
        self._count += n
        done = []
        while True:
            need = TIME_STRIDE if self._started else 1
            if self._count < need:
                break
            buf = np.concatenate(self._pending, axis=1) if len(self._pending) > 1 else self._pending[0]
            done.append(self._encode_group(buf[:, :need]))
            self._started = True
            rest = buf[:, need:]
            self._pending, self._count = ([rest] if rest.shape[1] else []), rest.shape[1]
        return done

    def close(self) -> int:
        """End the stream; returns how many trailing frames were left over (fewer than 4, not encoded)."""
        left = self._count
        self._pending, self._count = [], 0
        self.vae.clear_cache()
        return left


class CausalStreamDecoder:
    """Feed normalised latent frames in any chunking; get video frames as each latent frame is decoded (1 frame
    for latent frame 0, 4 for each later one), as diffusers' `decode` would make them all at once.

    diffusers' `AutoencoderKLWan._decode` already decodes one latent frame at a time with a feature cache; this
    drives the same decoder and cache one pushed chunk at a time, so a generator's frames can be written while it
    still samples the next ones, with memory bounded by one latent frame. Equal to `vae.decode` (tested). Shares
    the VAE's caches: one stream (encoder or decoder) per VAE at a time.
    """

    def __init__(self, wan: WanVae):
        self.wan = wan
        self.vae = wan.vae
        self.vae.clear_cache()
        self.latent_frames = 0

    @torch.inference_mode()
    def push(self, latents: torch.Tensor) -> np.ndarray:
        """latents [B, C, n, h, w] (normalised) -> uint8 frames [B, 1 or 4 per latent frame, H, W, 3]."""
        vae = self.vae
        x = vae.post_quant_conv(self.wan.denormalise(latents.to(self.wan.device, torch.float32)).to(self.wan.dtype))
        out = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                   first_chunk=self.latent_frames == 0))  # [B, 3, 1 or 4, H, W]
            self.latent_frames += 1
        return output_to_frames(torch.cat(out, 2))

    def close(self) -> None:
        self.vae.clear_cache()
