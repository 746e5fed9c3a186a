"""The run summary the CLI prints, as text: the same lines become the top-level run's Prefect artifact."""
from __future__ import annotations

from tasks.reasons import shorten


def preprocess_lines(report: dict, seconds: float | None = None) -> list[str]:
    profile = report.get("profile", "talking_head")
    lines = [f"== {report['dataset']}: {report['clips_out']}/{report['clips_in']} clips made it through"
             + ("" if profile == "talking_head" else f" ({profile} profile)")]
    lines += [f"   - {r['clip_id']}: {r['status']} at {r['step']} [{r['reason']}] {r['detail']}" for r in report["rejected"]]
    lines.append(f"{'step':<16}{'ok':>5}{'rej':>5}{'retry':>6}{'fail':>6}{'cached':>8}{'seconds':>10}")
    lines += [f"{c['step']:<16}{c['ok']:>5}{c['rejected']:>5}{c.get('retryable', 0):>6}{c['failed']:>6}{c['skipped']:>8}"
              f"{c['seconds']:>10.2f}" for c in report["step_counts"]]
    if report.get("clips_retryable"):
        lines.append(f"{report['clips_retryable']} clips hit a transient failure (network, timeout): "
                     "run again to retry them")
    sh = report.get("shards")
    if sh:
        lines.append(f"samples: {sh['samples']} in {sh['shards']} shards ({sh['bytes'] / 1e6:.1f} MB), "
                     f"per split {sh['per_split']}")
    if report.get("gate"):
        lines.append(f"gate 3d_latent_quality: {report['gate']['name']} - {report['gate']['message']}")
        if report["gate"].get("action"):
            lines.append(f"   -> {report['gate']['action']}")
    if report.get("audit"):
        lines.append(f"audit: {report['audit']['summary']}")
    if report.get("contact_sheet"):
        lines.append(f"contact sheet: {report['contact_sheet']}")
    if seconds is not None:
        lines.append(f"wall time: {seconds:.1f}s" + (f" (runner: {report['runner']})" if report.get("runner") else ""))
    lines.append(f"output: {report['output']}")
    return lines


def training_lines(t: dict) -> list[str]:
    return [f"training: {t['state']} after {t['steps']} steps, loss {t['first_loss']:.4f} -> {t['last_loss']:.4f}, "
            f"{t['samples_per_s'] or 0:.1f} samples/s ({t['run_dir']})"] + ([t["validation"]] if t.get("validation") else [])


def run_lines(result: dict, seconds: float | None = None) -> list[str]:
    """A preprocess report, or a pipeline/dry-run result {"preprocess": ..., "general": ..., "program": ...,
    "training": ...} (the dry-run's general-video preprocess and its training program, when it ran them)."""
    lines = preprocess_lines(result.get("preprocess", result), seconds if not result.get("program") else None)
    if result.get("general"):
        lines += preprocess_lines(result["general"])
    if result.get("program"):
        lines += program_lines(result["program"], seconds)
    if result.get("training"):
        lines += training_lines(result["training"])
    return lines


def program_lines(result: dict, seconds: float | None = None) -> list[str]:
    """The training program's stage table: one line per stage run, then the decisions taken between stages."""
    w = max([18] + [len(r["run"]) + 2 for r in result["stages"]])  # a warm start's label is long
    lines = [f"== training program {result['program']}",
             f"{'stage':<10}{'run':<{w}}{'verdict':<15}{'steps':>6}  gates judged"]
    lines += [f"{r['stage']:<10}{r['run']:<{w}}{r['verdict']:<15}{r['steps']:>6}  {r['gates']}" for r in result["stages"]]
    lines += [f"after {d['stage']}: {d['decision']} ({shorten(d['why'], 160)})" for d in result["decisions"]]
    if seconds is not None:
        lines.append(f"wall time: {seconds:.1f}s")
    lines.append(f"record: {result['record']}")
    return lines
