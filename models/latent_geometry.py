"""What the Wan 2.1 VAE does to video: the facts DualForce is built around and the shard contract checks against.

They belong to the model (diffusers' AutoencoderKLWan config: z_dim 16, causal 4x time, 8x space), so they live
here and tasks/contract.py takes them from here, not the other way round.
"""
LATENT_CHANNELS = 16  # z_dim
VAE_TIME_STRIDE = 4  # causal in time: frame 0 alone, then groups of 4 (4n+1 video frames -> n+1 latent frames)
VAE_SPACE_STRIDE = 8  # 512x512 frames -> 64x64 latents
