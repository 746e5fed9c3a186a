"""Peak memory of one preprocessing worker, each step measured in a fresh child process.

    python -m benchmarks.worker_memory [--minutes 1] [--size 1920x1080] [--steps download crop motion]
    python -m benchmarks.worker_memory --minutes 10          # the 10-minute 1080p figure (goal <= 2 GiB)

A long 1080p source is made by looping a sample clip (`-stream_loop`, scaled to --size, ultrafast x264).
Each step then runs in its own fresh Python process, so its peak is not hidden by an earlier step's:
- `worker_peak`: VmHWM of the Python process (from /proc/self/status), the number the 2 GiB goal is about;
- `ffmpeg_peak`: ru_maxrss of the largest finished child (the ffmpeg decoders/encoders it drove); Linux
  counts a child's RSS from before exec too, so this is an upper bound (it can equal the worker's size at spawn);
- `baseline`: the VmHWM of a child that only imports the same modules (measured in the same run), so
  `above_baseline` is what the step itself added.

The same probe backs tests/test_bounded_memory.py (a short and a 4x longer source must peak alike).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = REPO.parent / "shared" / "samples" / "more" / "lp_s18.mp4"
STEPS = ("download", "crop", "motion")


@dataclass(frozen=True)
class StepPeak:
    step: str
    frames: int  # video frames the step produced/consumed (25 fps)
    seconds: float
    worker_peak_kb: int  # VmHWM of the worker process
    ffmpeg_peak_kb: int  # largest ru_maxrss among its finished child processes

    @property
    def worker_peak_mb(self) -> float:
        return self.worker_peak_kb / 1024


def make_looped_source(sample: Path, out: Path, seconds: float, size: str | None = None, fps: int = 25) -> Path:
    """`seconds` of `sample` played in a loop (video and audio), optionally scaled to WxH, as H.264 + AAC."""
    from tasks.media import run_ffmpeg

    vf = [f"fps={fps}"] + ([f"scale={size.replace('x', ':')}"] if size else [])
    tmp = out.with_name(out.name + ".tmp.mp4")
    run_ffmpeg(["-y", "-stream_loop", "-1", "-i", str(sample), "-t", f"{seconds:.3f}", "-vf", ",".join(vf),
                "-c:v", "libx264", "-preset", "ultrafast", "-crf", "23", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-b:a", "128k", str(tmp)], f"looping {sample.name} to {seconds:.0f}s")
    tmp.replace(out)
    return out


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _child(task: str, source: Path, out: Path) -> dict:
    """Runs inside the fresh process: one step on one input (or, for `baseline:<step>`, only its imports)."""
    step = task.split(":", 1)[-1]
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose from {STEPS}")
    from datasets_manifest.schema import ClipRow
    from tasks.steps.crop import CROP_INFO, CROP_VIDEO, crop_clip
    from tasks.steps.download import DownloadConfig, download_clip

    if step == "motion":
        from tasks.feature_models import dryrun_models, motion_extractor
        from tasks.steps.motion import extract_motion_from_video
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    frames = 0
    if task.startswith("baseline:"):
        pass
    elif step == "download":
        row = ClipRow(clip_id="memprobe", dataset="bench", source=str(source), identity="bench")
        r = download_clip(row, out, DownloadConfig(cache_dir=out / "_cache"))
        frames = int(round(r.duration_s * 25))
    elif step == "crop":
        frames = crop_clip(source, out).frames
    else:  # motion, with the dry-run extractor (same architecture family, small and random)
        extractor = motion_extractor(dryrun_models())
        frames = extract_motion_from_video(source / CROP_VIDEO, extractor, out / "motion.npz", device="cpu").num_frames
        expected = json.loads((source / CROP_INFO).read_text())["frames"]
        if frames != expected:
            raise RuntimeError(f"motion gave {frames} rows for {expected} frames")
    return {"step": task, "frames": frames, "seconds": time.perf_counter() - t0, "worker_peak_kb": _vm_hwm_kb(),
            "ffmpeg_peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def measure_step(step: str, source: Path, out: Path, timeout_s: float = 1800, env: dict | None = None) -> StepPeak:
    """Run `step` on `source` (a video; for motion, a crop directory) in a fresh process; its peaks."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker_memory", "--child", step, str(source), str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} child failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return StepPeak(**json.loads(proc.stdout.strip().splitlines()[-1]))


def measure_chain(source: Path, work: Path, steps: tuple[str, ...] = STEPS) -> dict[str, StepPeak]:
    """download -> crop -> motion, each step in its own process, each fed by the previous one's output."""
    peaks: dict[str, StepPeak] = {}
    current = source
    for step in steps:
        out = work / step
        peaks[step] = measure_step(step, current, out)
        if step == "download":
            current = out / "memprobe.mp4"
        elif step == "crop":
            current = out
    return peaks


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.0, help="length of the looped source (10 for the full figure)")
    p.add_argument("--size", default="1920x1080", help="source frame size")
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="clip to loop (needs a face and audio)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--goal-gib", type=float, default=2.0)
    p.add_argument("--keep", type=Path, help="keep the source and outputs in this folder")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        source = make_looped_source(args.sample, work / f"looped-{args.minutes:g}min.mp4", args.minutes * 60, args.size)
        made_s = time.perf_counter() - t0
        steps = tuple(s for s in STEPS if s in args.steps)
        if "crop" not in steps and "motion" in steps:
            p.error("motion reads the crop step's output: include crop")
        peaks = measure_chain(source, work, steps)
        baselines = {s: measure_step(f"baseline:{s}", source, work / "baseline") for s in steps}
        goal_kb = args.goal_gib * 2**20
        result = {
            "source": f"{args.sample.name} looped to {args.minutes:g} min at {args.size} (made in {made_s:.0f}s)",
            "goal_gib": args.goal_gib,
            "steps": [
                dict({k: v for k, v in asdict(pk).items() if not k.endswith("_kb")},
                     seconds=round(pk.seconds, 1),
                     worker_peak_mb=round(pk.worker_peak_mb, 1),
                     baseline_mb=round(baselines[pk.step].worker_peak_mb, 1),
                     above_baseline_mb=round((pk.worker_peak_kb - baselines[pk.step].worker_peak_kb) / 1024, 1),
                     ffmpeg_peak_mb=round(pk.ffmpeg_peak_kb / 1024, 1),
                     ratio_to_goal=round(pk.worker_peak_kb / goal_kb, 3))
                for pk in peaks.values()
            ],
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
