"""Skip-if-done, versioned recompute, cached rejections, retried failures, atomic outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets_manifest.schema import ClipRow
from tasks.errors import ClipRejected
from tasks.ledger import read_ledger, step_counts, write_ledger_part
from tasks.step_runner import ClipState, run_step
from tasks.step_store import StepStore


@dataclass
class Upper:
    """Writes the clip id upper-cased; rejects ids containing 'bad', crashes on 'boom' while `explode`."""

    name: str = "upper"
    version: str = "1"
    requires: tuple = ()
    explode: bool = True
    calls: list = field(default_factory=list)

    def fingerprint(self) -> str:
        return "cfg"

    def run(self, row, inputs, out_dir: Path) -> dict:
        self.calls.append(row.clip_id)
        if "bad" in row.clip_id:
            raise ClipRejected("no_face", "nothing to see")
        if "boom" in row.clip_id and self.explode:
            raise RuntimeError("disk on fire")
        (out_dir / "out.txt").write_text(row.clip_id.upper())
        return {"n": 1}


@dataclass
class Exclaim:
    name: str = "exclaim"
    version: str = "1"
    requires: tuple = ("upper",)
    calls: list = field(default_factory=list)

    def fingerprint(self) -> str:
        return "cfg"

    def run(self, row, inputs, out_dir: Path) -> dict:
        self.calls.append(row.clip_id)
        (out_dir / "out.txt").write_text((inputs["upper"] / "out.txt").read_text() + "!")
        return {}


def _states(ids):
    return [ClipState(ClipRow(clip_id=i, dataset="t", source=f"/x/{i}.mp4", identity=i)) for i in ids]


def test_runs_skips_and_recomputes_only_what_changed(tmp_path):
    store = StepStore(tmp_path)
    up, ex = Upper(), Exclaim()
    ids = ["a", "b", "bad1", "boom"]

    states = _states(ids)
    e1 = run_step(up, states, store, "r1") + run_step(ex, states, store, "r1")
    assert (store.clip_dir("exclaim", "a") / "out.txt").read_text() == "A!"
    assert {(e.clip_id, e.step): e.status for e in e1} == {
        ("a", "upper"): "ok", ("b", "upper"): "ok", ("bad1", "upper"): "rejected", ("boom", "upper"): "failed",
        ("a", "exclaim"): "ok", ("b", "exclaim"): "ok",
    }
    rej = next(e for e in e1 if e.clip_id == "bad1")
    assert (rej.reason, rej.detail) == ("no_face", "nothing to see")
    boom = next(e for e in e1 if e.clip_id == "boom")
    assert boom.reason == "error" and "disk on fire" in boom.detail
    assert not store.clip_dir("upper", "boom").exists()  # a failure leaves no output

    # second run: ok and rejected results are reused; the failure is retried (and now succeeds)
    up.calls.clear(); ex.calls.clear(); up.explode = False
    states = _states(ids)
    e2 = run_step(up, states, store, "r2") + run_step(ex, states, store, "r2")
    assert up.calls == ["boom"] and ex.calls == ["boom"]
    assert {e.clip_id for e in e2 if e.action == "skipped"} == {"a", "b", "bad1"}

    # bumping the upstream version recomputes it; downstream recomputes only where the output changed
    up.calls.clear(); ex.calls.clear(); up.version = "2"
    states = _states(ids)
    run_step(up, states, store, "r3"); run_step(ex, states, store, "r3")
    assert sorted(up.calls) == ["a", "b", "bad1", "boom"]
    assert ex.calls == []  # same bytes upstream -> same key downstream

    # bumping the downstream version recomputes only downstream
    up.calls.clear(); ex.version = "2"
    states = _states(ids)
    run_step(up, states, store, "r4"); run_step(ex, states, store, "r4")
    assert up.calls == [] and sorted(ex.calls) == ["a", "b", "boom"]


def test_killed_step_leaves_no_output_and_staging_is_cleaned(tmp_path):
    store = StepStore(tmp_path)
    staging = store.staging_dir("upper", "a")  # what a kill mid-step leaves behind
    (staging / "out.txt").write_text("half")
    assert store.load("upper", "a") is None
    assert store.clean_staging() == 1 and not staging.exists()


def test_ledger_parts_and_counts(tmp_path):
    store = StepStore(tmp_path / "steps")
    up = Upper(explode=True)
    entries = run_step(up, _states(["a", "bad", "boom"]), store, "r1")
    write_ledger_part(tmp_path, entries, "run-1")
    write_ledger_part(tmp_path, run_step(up, _states(["a", "bad"]), store, "r2"), "run-2")
    table = read_ledger(tmp_path)
    assert table.num_rows == 5
    counts = step_counts(entries)
    assert counts == [{"step": "upper", "ok": 1, "rejected": 1, "failed": 1, "skipped": 0,
                       "seconds": counts[0]["seconds"], "reasons": "no_face×1, error×1"}]
    second = [r for r in table.to_pylist() if r["run_id"] == "r2"]
    assert {r["action"] for r in second} == {"skipped"}
