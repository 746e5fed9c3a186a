"""The crop step against a plain ffmpeg decode + crop + scale + encode of the same clip (goal: >= 0.5x).

    python -m benchmarks.crop_vs_ffmpeg [--clip ../shared/samples/sun.mp4 --repeats 2]

Baseline: one ffmpeg command on the same source doing what the crop step's output needs with no face work:
resample to 25 fps, a fixed square crop, scale to 512x512, libx264 at the crop step's crf/preset/threads
(tasks.media.VideoWriter), plus the 16 kHz mono wav. The crop step (tasks.steps.crop.crop_clip) tracks the face on
every frame (68-point landmarks, a detection every 10 frames), which is what the ratio pays for. Both crop
modes are measured in the same run: `static` (the default: a luma-only tracking decode, then one ffmpeg run
that crops + scales + encodes each segment's fixed box) and `follow` (one decode, a smoothed box per frame,
every frame warped in Python and piped to the encoder).
Figure: baseline seconds / crop seconds, best of --repeats each (1.0 = as fast as plain ffmpeg). Beside it, the
CPU seconds of each side's best run, split into this Python process (face tracking, warps) and its ffmpeg
children (decoder and encoder): on a machine whose cores are all busy, CPU seconds decide the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from tasks.media import probe, run_ffmpeg
from tasks.steps.crop import CropConfig, crop_clip

REPO = Path(__file__).resolve().parents[1]


def plain_ffmpeg(source: Path, out_dir: Path, cfg: CropConfig, preset: str = "veryfast", threads: int = 2) -> None:
    info = probe(source)
    side = min(info.width, info.height)
    d = cfg.params.dsize
    vf = f"fps=25,crop={side}:{side}:{(info.width - side) // 2}:{(info.height - side) // 2},scale={d}:{d}"
    args = ["-y", "-i", str(source), "-map", "0:v", "-vf", vf, "-c:v", "libx264", "-preset", preset,
            "-crf", str(cfg.crf), "-pix_fmt", "yuv420p", "-threads", str(threads), str(out_dir / "plain.mp4")]
    if info.has_audio:
        args += ["-map", "0:a", "-ac", "1", "-ar", "16000", str(out_dir / "plain.wav")]
    run_ffmpeg(args, "plain ffmpeg crop")


def _cpu() -> tuple[float, float]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def best_seconds(fn, repeats: int) -> tuple[float, dict]:
    """Best wall seconds of `repeats` calls, and the CPU seconds (python, ffmpeg children) of that call."""
    best, cpu = float("inf"), {}
    for _ in range(repeats):
        (own0, kids0), t0 = _cpu(), time.perf_counter()
        fn()
        wall, (own1, kids1) = time.perf_counter() - t0, _cpu()
        if wall < best:
            best, cpu = wall, {"python": round(own1 - own0, 2), "ffmpeg": round(kids1 - kids0, 2)}
    return best, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", type=Path, default=REPO.parent / "shared" / "samples" / "sun.mp4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--goal", type=float, default=0.5)
    args = p.parse_args()
    out = {"clip": args.clip.name, "cores": len(os.sched_getaffinity(0)), "goal": f">= {args.goal}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crop_clip(args.clip, tmp / "warm", CropConfig())  # load the landmarker, warm the page cache
        plain_s, plain_cpu = best_seconds(lambda: plain_ffmpeg(args.clip, tmp, CropConfig()), args.repeats)
        out.update(baseline_plain_ffmpeg_s=round(plain_s, 2), cpu_s_plain=plain_cpu)
        for mode in ("follow", "static"):
            cfg = CropConfig(mode=mode)
            frames = 0

            def crop_once():
                nonlocal frames
                frames = crop_clip(args.clip, tmp / f"crop-{mode}", cfg).frames

            crop_s, crop_cpu = best_seconds(crop_once, args.repeats)
            ratio = plain_s / crop_s
            out[mode] = {"frames": frames, "crop_step_s": round(crop_s, 2), "crop_fps": round(frames / crop_s, 1),
                         "ratio_plain_to_crop": round(ratio, 3), "cpu_s_crop": crop_cpu, "met": ratio >= args.goal}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
