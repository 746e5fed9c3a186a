"""FlexAttention (BlockMask) against SDPA with a dense boolean mask, at the `lite` video self-attention shape.

    python -m benchmarks.gpu_attention [--size real|tiny --json OUT]

`real`: one `lite` layer's frame-causal self-attention in training -- the reference + 6 latent frames (21 video
frames) of 32x32 tokens (512² crop) = 7,168 tokens, 12 heads of 128, bf16, forward + backward. `tiny`: 64 tokens a
frame, 2 heads of 32, fp32, forward only for flex (torch has no FlexAttention backward on CPU; eager flex
materialises the scores, so the CPU figure only shows the path runs). Baseline in the same run: SDPA with the dense
mask (what the model ran before); beside it, unmasked SDPA (the flash kernel over every tile: the work a mask-free
kernel would do). Prints ms per call, flex / SDPA, and the share of tiles the BlockMask computes.
"""
from __future__ import annotations

import torch

from benchmarks.gpu_common import finish, parser, settle, timed
from models.dualforce.attention import attend
from models.dualforce.masking import REFERENCE_FRAME, frame_causal_mask


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    device, size = settle(args)
    latent_frames = 6
    tokens, heads, head_dim = (1024, 12, 128) if size == "real" else (64, 2, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames = torch.cat([torch.full((tokens,), REFERENCE_FRAME), torch.arange(latent_frames).repeat_interleave(tokens)])
    mask = frame_causal_mask(frames, frames, device)
    n = len(frames)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    backward = device.type == "cuda"

    def call(backend, masked=True):
        def run():
            if backward:
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                attend(qq, kk, vv, mask if masked else None, backend).sum().backward()
            else:
                with torch.no_grad():
                    attend(q, k, v, mask if masked else None, backend)
        return run

    reps = args.repeats
    sdpa_s = timed(call("sdpa"), device, reps, warmup=2)
    flex_s = timed(call("flex"), device, reps, warmup=3)  # the first calls compile the kernel
    flash_s = timed(call("sdpa", masked=False), device, reps, warmup=2)
    with torch.no_grad():
        agree = float((attend(q, k, v, mask, "flex").float() - attend(q, k, v, mask, "sdpa").float()).abs().max())
    return finish("gpu_attention", args, device, size, {
        "tokens": n, "heads": heads, "head_dim": head_dim, "dtype": str(dtype), "backward": backward,
        "sdpa_dense_mask_ms": sdpa_s * 1e3, "flex_block_mask_ms": flex_s * 1e3, "sdpa_unmasked_ms": flash_s * 1e3,
        "flex_over_sdpa": flex_s / sdpa_s, "visible_tile_fraction": mask.visible_block_fraction(),
        "max_abs_difference": agree,
    })


if __name__ == "__main__":
    main()
