"""DualForce: causal dual-stream (video + 3D struct) diffusion-forcing DiT conditioned on audio and a reference."""
from .config import CONFIG_NAMES, DualForceConfig, get_config
from .diffusion_forcing import DiffusionForcingConfig, diffusion_forcing_loss, sample_sigmas
from .info import measure, model_info
from .model import DualForce, build_model
from .sampler import GeneratedChunk, SamplerConfig, generate, stream

__all__ = [
    "CONFIG_NAMES", "DualForce", "DualForceConfig", "DiffusionForcingConfig", "GeneratedChunk", "SamplerConfig",
    "build_model", "diffusion_forcing_loss", "generate", "get_config", "measure", "model_info", "sample_sigmas",
    "stream",
]
