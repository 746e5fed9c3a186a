"""Skip-if-done, versioned recompute, cached rejections, retried failures, atomic outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets_manifest.schema import ClipRow
from tasks.errors import ClipRejected, ClipRetryable
from tasks.ledger import read_ledger, step_counts, write_ledger_part
from tasks.step_runner import ClipState, run_step, stale_scan, step_key
from tasks.step_store import StepStore


@dataclass
class Upper:
    """Writes the clip id upper-cased; rejects ids containing 'bad', crashes on 'boom' while `explode`, fails
    transiently while `down` (like a source behind a dead link)."""

    name: str = "upper"
    version: str = "1"
    requires: tuple = ()
    explode: bool = True
    down: bool = False
    calls: list = field(default_factory=list)

    def fingerprint(self) -> str:
        return "cfg"

    def run(self, row, inputs, out_dir: Path) -> dict:
        self.calls.append(row.clip_id)
        if self.down:
            raise ClipRetryable("unreachable", "connection refused")
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
    up.calls.clear()
    ex.calls.clear()
    up.explode = False
    states = _states(ids)
    e2 = run_step(up, states, store, "r2") + run_step(ex, states, store, "r2")
    assert up.calls == ["boom"] and ex.calls == ["boom"]
    assert {e.clip_id for e in e2 if e.action == "skipped"} == {"a", "b", "bad1"}

    # bumping the upstream version recomputes it; downstream recomputes only where the output changed
    up.calls.clear()
    ex.calls.clear()
    up.version = "2"
    states = _states(ids)
    run_step(up, states, store, "r3")
    run_step(ex, states, store, "r3")
    assert sorted(up.calls) == ["a", "b", "bad1", "boom"]
    assert ex.calls == []  # same bytes upstream -> same key downstream

    # bumping the downstream version recomputes only downstream
    up.calls.clear()
    ex.version = "2"
    states = _states(ids)
    run_step(up, states, store, "r4")
    run_step(ex, states, store, "r4")
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
    assert counts == [{"step": "upper", "ok": 1, "rejected": 1, "retryable": 0, "failed": 1, "skipped": 0,
                       "seconds": counts[0]["seconds"], "reasons": "no_face×1, error×1"}]
    second = [r for r in table.to_pylist() if r["run_id"] == "r2"]
    assert {r["action"] for r in second} == {"skipped"}


def test_retry_rejected_reruns_cached_rejections_only(tmp_path):
    store, up = StepStore(tmp_path), Upper(explode=False)
    run_step(up, _states(["a", "bad1"]), store, "r1")
    up.calls.clear()
    e = run_step(up, _states(["a", "bad1"]), store, "r2")
    assert up.calls == [] and {x.action for x in e} == {"skipped"}
    e = run_step(up, _states(["a", "bad1"]), store, "r3", retry_rejected=True)
    assert up.calls == ["bad1"]  # the ok result is still reused
    assert {(x.clip_id, x.status, x.action) for x in e} == {("a", "ok", "skipped"), ("bad1", "rejected", "ran")}


def test_retryable_is_recorded_counted_apart_and_never_reused(tmp_path):
    store, flaky, ex = StepStore(tmp_path), Upper(down=True), Exclaim()  # exclaim reads upper's output
    states = _states(["a"])
    e = run_step(flaky, states, store, "r1") + run_step(ex, states, store, "r1")
    assert [(x.step, x.status, x.reason) for x in e] == [("upper", "retryable", "unreachable")]  # exclaim: not reached
    assert not states[0].alive and store.load("upper", "a").status == "retryable"
    assert step_counts(e)[0]["retryable"] == 1 and step_counts(e)[0]["ok"] == 0
    run_step(flaky, _states(["a"]), store, "r2")  # still down: tried again, not taken from the cache
    assert flaky.calls == ["a", "a"]
    flaky.down = False
    states = _states(["a"])
    e = run_step(flaky, states, store, "r3") + run_step(ex, states, store, "r3")
    assert [(x.step, x.status, x.action) for x in e] == [("upper", "ok", "ran"), ("exclaim", "ok", "ran")]


def test_row_fields_enter_the_key_and_steps_without_them_keep_theirs(tmp_path):
    from tasks.step_store import fingerprint

    row = _states(["a"])[0].row
    up = Upper()
    assert step_key(up, [], row) == fingerprint("upper", "1", "cfg", [])  # the key it had before row fields
    up.row_fields = lambda r: {"source": r.source}
    moved = row.model_copy(update={"source": "/y/a.mp4"})
    assert step_key(up, [], row) != step_key(up, [], moved) != fingerprint("upper", "1", "cfg", [])


@dataclass
class CountedPrint(Exclaim):
    """Exclaim whose config fingerprint counts its calls."""

    prints: list = field(default_factory=list)

    def fingerprint(self) -> str:
        self.prints.append(1)
        return "cfg"


def test_stale_scan_hashes_each_steps_config_once_whatever_the_clip_count(tmp_path):
    """The config hash was a third of a 10,000-row scan: one per step per scan, and the same verdicts as per clip."""
    store = StepStore(tmp_path)
    ids = [f"c{i}" for i in range(6)]
    states = _states(ids)
    run_step(Upper(), states, store, "r1")
    run_step(Exclaim(), states, store, "r1")
    for n in (2, 6):
        counted = CountedPrint()
        listing = stale_scan([Upper(), counted], [s.row for s in states[:n]], store)
        assert len(counted.prints) == 1
        assert [(r["step"], r["current"], r["stale"]) for r in listing] == [("upper", n, 0), ("exclaim", n, 0)]
    listing = stale_scan([Upper(version="2"), CountedPrint()], [s.row for s in states], store)
    assert [(r["step"], r["stale"], r["behind_stale"]) for r in listing] == [("upper", 6, 0), ("exclaim", 0, 6)]


def test_stale_scan_reads_in_chunks_and_gives_the_verdicts_of_one_pass(tmp_path, monkeypatch):
    """Status files are read a chunk of clips at a time: chunks of 2 over 5 clips (one missing, one stale) give the
    verdicts of a single chunk, and each clip's verdict comes from its own records, not a neighbour's."""
    import tasks.step_runner as step_runner

    store = StepStore(tmp_path)
    states = _states([f"c{i}" for i in range(5)])
    run_step(Upper(), states[:4], store, "r1")
    run_step(Exclaim(), states[:4], store, "r1")
    run_step(Exclaim(version="2"), states[1:2], store, "r2")  # c1's exclaim is now under another key
    rows = [s.row for s in states]
    whole = stale_scan([Upper(), Exclaim()], rows, store)
    monkeypatch.setattr(step_runner, "SCAN_CHUNK", 2)
    assert stale_scan([Upper(), Exclaim()], rows, store) == whole
    assert [(r["step"], r["current"], r["stale"], r["missing"]) for r in whole] == [
        ("upper", 4, 0, 1), ("exclaim", 3, 1, 1)]
    assert [(r["current"], r["stale"]) for r in stale_scan([Upper(), Exclaim()], rows[1:2], store)] == [(1, 0), (0, 1)]
