"""The training program's record: every stage run, its verdict and the branch taken, in OUT/program.json.

Rewritten (temp + rename) after every stage run, so an interrupted program still says how far it got and why;
the same rows make the program's table artifact and the CLI's stage table.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tasks.reasons import shorten

RECORD_FILE = "program.json"


@dataclass
class StageRun:
    stage: str  # concept | pretrain | joint
    run: str  # e.g. "sigma_s max 0.7", "video-only", "from pretrain"
    verdict: str  # GO | NO-GO | the failed state's name | SKIPPED
    message: str
    train_dir: str
    run_dir: Optional[str] = None  # the attempt the stage's train flow ended in (its last verdict names it)
    steps: int = 0
    seconds: float = 0.0
    gates: list[dict[str, Any]] = field(default_factory=list)  # that run's gates.jsonl


@dataclass
class ProgramRecord:
    name: str
    out_dir: Path
    runs: list[StageRun] = field(default_factory=list)
    decisions: list[dict[str, str]] = field(default_factory=list)  # stage -> what the program did next, and why
    started: float = field(default_factory=time.time)

    def add(self, run: StageRun) -> None:
        self.runs.append(run)
        self.save()

    def decide(self, stage: str, decision: str, why: str) -> None:
        self.decisions.append({"stage": stage, "decision": decision, "why": why})
        self.save()

    def table(self) -> list[dict[str, Any]]:
        """One row per stage run: what a person reads first."""
        return [{"stage": r.stage, "run": r.run, "verdict": r.verdict, "steps": r.steps,
                 "gates": ", ".join(f"{g['gate']}@{g['step']} {g['verdict']}" for g in r.gates),
                 "seconds": round(r.seconds, 1), "detail": shorten(r.message, 300)} for r in self.runs]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "out_dir": str(self.out_dir), "started": self.started,
                "runs": [asdict(r) for r in self.runs], "decisions": self.decisions}

    def save(self) -> Path:
        path = self.out_dir / RECORD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=str))
        os.replace(tmp, path)
        return path

    def markdown(self, headline: Optional[str] = None) -> str:
        lines = [f"## Training program `{self.name}`" + (f": **{headline}**" if headline else ""), "",
                 "| stage | run | verdict | steps | gates judged | detail |", "|---|---|---|---|---|---|"]
        for row in self.table():
            detail = row["detail"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['stage']} | {row['run']} | **{row['verdict']}** | {row['steps']} | "
                         f"{row['gates']} | {detail} |")
        if self.decisions:
            lines += ["", "Decisions:", ""] + [f"- after **{d['stage']}**: {d['decision']} ({d['why']})"
                                               for d in self.decisions]
        lines += ["", f"Record: `{self.out_dir / RECORD_FILE}`"]
        return "\n".join(lines) + "\n"
