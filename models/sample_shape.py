"""The two sizes of a training sample that every layer shares, defined once (the shard writer, the VAE step, the
storage plan, the loader, the trainer and the model all default to these).

A window is `window_frames` video frames, always 4n+1 (the Wan VAE's causal 4x time stride gives n+1 latent
frames); `audio_dim` is the HuBERT feature width the shards carry.
"""
WINDOW_FRAMES = 33  # 4 * 8 + 1: 1.32 s at 25 fps, 9 latent frames
HUBERT_LARGE_DIM = 1024  # hubert-large, the extractor of every deployment (hubert-base would be 768)
