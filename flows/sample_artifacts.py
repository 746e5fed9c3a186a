"""The newest validation samples of a training run as a Prefect artifact: the contact sheet (ground truth over
generated, per held-out clip) inline, and a table of the clips with their side-by-side mp4s beside it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect.artifacts import create_markdown_artifact

from flows.gate_artifacts import artifact_key
from flows.review import image_markdown
from training.validation import latest_samples


def samples_markdown(latest: dict) -> str:
    folder = Path(latest["dir"])
    dryrun = latest.get("untrained_dryrun_models")
    lines = [f"## Validation samples at step {latest['step']} ({latest['weights']} weights)", ""]
    if dryrun:
        lines += [f"Made with untrained dry-run extractors ({', '.join(dryrun)}): plumbing, not pictures.", ""]
    lines += ["| clip | split | frames | seconds | video (truth \\| generated) |", "|---|---|---|---|---|"]
    lines += [f"| {c['key']} | {c['split']} | {c['frames']} | {c['seconds']:.1f} | `{folder / c['video']}` |"
              for c in latest["clips"]]
    lines += ["", image_markdown(folder / latest["sheet"])]
    if latest.get("conditioning"):
        lines += ["", "### Conditioning use (altered / true loss; 1.00: the input is ignored)", "",
                  "| metric | ratio (median) | spread (q25-q75) | good |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r.get('ratio (median)')} | {r.get('spread (q25-q75)') or ''} | {r['good']} |"
                  for r in latest["conditioning"]]
    return "\n".join(lines)


def publish_validation_samples(run_dir: Path, published: set[int]) -> Optional[int]:
    """Publish the run's newest validation round unless its step is in `published`; returns the step published."""
    latest = latest_samples(run_dir)
    if latest is None or latest["step"] in published:
        return None
    create_markdown_artifact(samples_markdown(latest), key=artifact_key(Path(run_dir).name, "validation-samples"),
                             description=f"validation samples at step {latest['step']}")
    published.add(latest["step"])
    return latest["step"]
