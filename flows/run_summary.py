"""The run summary: as text for the CLI, and as markdown tables (which wrap in the Prefect UI, where a fixed-width
block was cut off at 1400 px) for the top-level run's artifact. Both read the same report."""
from __future__ import annotations

from collections import Counter

from tasks.reasons import shorten

LISTED_CLIPS = 10  # clips a summary names one by one; past that it counts them by reason (the ledger has them all)


def rejected_by_reason(rejected: list[dict]) -> list[tuple[str, int]]:
    """(status at step [reason], clips), most clips first."""
    return Counter(f"{r['status']} at {r['step']} [{r['reason']}]" for r in rejected).most_common()


def preprocess_lines(report: dict, seconds: float | None = None) -> list[str]:
    profile = report.get("profile", "talking_head")
    lines = [f"== {report['dataset']}: {report['clips_out']}/{report['clips_in']} clips made it through"
             + ("" if profile == "talking_head" else f" ({profile} profile)")]
    rejected = report["rejected"]
    if len(rejected) <= LISTED_CLIPS:
        lines += [f"   - {r['clip_id']}: {r['status']} at {r['step']} [{r['reason']}] {r['detail']}" for r in rejected]
    else:
        reasons = rejected_by_reason(rejected)
        lines.append(f"   {len(rejected)} clips did not make it, by reason (each clip in the ledger):")
        lines += [f"   - {n} {why}" for why, n in reasons[:LISTED_CLIPS]]
        if len(reasons) > LISTED_CLIPS:
            lines.append(f"   - {sum(n for _, n in reasons[LISTED_CLIPS:])} more, for {len(reasons) - LISTED_CLIPS} "
                         "other reasons")
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
    if result.get("next_commands"):
        lines += ["", "next: export the joint model, generate from a sample face and speech, evaluate it"]
        lines += [f"  {c}" for c in result["next_commands"]]
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


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")  # a pipe or newline would break the row


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def preprocess_markdown(report: dict) -> list[str]:
    profile = report.get("profile", "talking_head")
    lines = [f"### {report['dataset']}: {report['clips_out']}/{report['clips_in']} clips made it through"
             + ("" if profile == "talking_head" else f" ({profile} profile)"), ""]
    rejected = report["rejected"]
    if 0 < len(rejected) <= LISTED_CLIPS:
        lines += _table(["clip", "status", "step", "reason", "detail"],
                        [[r["clip_id"], r["status"], r["step"], r["reason"], r["detail"]] for r in rejected])
        lines.append("")
    elif rejected:
        lines += [f"{len(rejected)} clips did not make it (each in the ledger and the failures table):", ""]
        lines += _table(["clips", "why"], [[n, why] for why, n in rejected_by_reason(rejected)])
        lines.append("")
    lines += _table(["step", "ok", "rejected", "retry", "failed", "cached", "seconds"],
                    [[c["step"], c["ok"], c["rejected"], c.get("retryable", 0), c["failed"], c["skipped"],
                      f"{c['seconds']:.2f}"] for c in report["step_counts"]])
    lines.append("")
    sh = report.get("shards")
    if sh:
        lines.append(f"- samples: **{sh['samples']}** in {sh['shards']} shards ({sh['bytes'] / 1e6:.1f} MB), "
                     f"per split {sh['per_split']}")
    if report.get("gate"):
        lines.append(f"- gate `3d_latent_quality`: **{report['gate']['name']}**: {report['gate']['message']}")
    if report.get("audit"):
        lines.append(f"- audit: {report['audit']['summary']}")
    lines.append(f"- output: `{report['output']}`")
    return lines + [""]


def run_markdown(result: dict, seconds: float | None = None) -> str:
    """`run_lines`' content as markdown: per preprocess a step table, the program's stage table with each stage's
    verdict and gates, the training line and the next commands."""
    lines = ["## Summary" + (f" ({seconds:.1f} s)" if seconds is not None else ""), ""]
    lines += preprocess_markdown(result.get("preprocess", result))
    if result.get("general"):
        lines += preprocess_markdown(result["general"])
    program = result.get("program")
    if program:
        lines += [f"### Training program `{program['program']}`", ""]
        lines += _table(["stage", "run", "verdict", "steps", "gates judged"],
                        [[r["stage"], r["run"], f"**{r['verdict']}**", r["steps"], r["gates"]] for r in program["stages"]])
        lines += [""] + [f"- after {d['stage']}: **{d['decision']}** ({shorten(d['why'], 300)})"
                         for d in program["decisions"]]
        lines += [f"- record: `{program['record']}`", ""]
    if result.get("training"):
        lines += [f"- {line}" for line in training_lines(result["training"])] + [""]
    if result.get("next_commands"):
        lines += ["### Next", "", "```bash", *result["next_commands"], "```"]
    return "\n".join(lines)
