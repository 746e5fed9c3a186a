"""Splits: deterministic, identity-disjoint, stable as identities are added, published splits honoured."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from datasets_manifest.schema import ClipRow
from datasets_manifest.splits import (
    MIN_IDENTITIES_FOR_HOLDOUT,
    assign_splits,
    check_fractions,
    identity_unit,
    split_for_unit,
)


def rows_for(n_identities: int, clips_each: int = 3, dataset: str = "toy") -> list[ClipRow]:
    return [
        ClipRow(clip_id=f"{dataset}_p{i}_{k}", dataset=dataset, source=f"youtube:abcdefghij{k}",
                start_s=0.0, end_s=4.0, identity=f"person{i}")
        for i in range(n_identities)
        for k in range(clips_each)
    ]


def split_map(rows) -> dict[str, str]:
    return {r.clip_id: r.split for r in rows}


def test_identity_disjoint_and_close_to_fractions():
    rows, notes = assign_splits(rows_for(4000), "toy", seed=0, split_fractions=(0.8, 0.1, 0.1))
    by_identity: dict[str, set[str]] = {}
    for r in rows:
        by_identity.setdefault(r.identity, set()).add(r.split)
    assert all(len(s) == 1 for s in by_identity.values())  # no identity in two splits
    counts = Counter(next(iter(s)) for s in by_identity.values())
    assert counts["train"] / 4000 == pytest.approx(0.8, abs=0.03)
    assert counts["val"] / 4000 == pytest.approx(0.1, abs=0.02)
    assert counts["test"] / 4000 == pytest.approx(0.1, abs=0.02)
    assert notes == []


def test_same_seed_same_splits_other_seed_other_splits():
    a, _ = assign_splits(rows_for(300), "toy", seed=7)
    b, _ = assign_splits(list(reversed(rows_for(300))), "toy", seed=7)
    c, _ = assign_splits(rows_for(300), "toy", seed=8)
    assert split_map(a) == split_map(b)  # order of rows does not matter
    assert split_map(a) != split_map(c)
    held_out_a = {r.identity for r in a if r.split != "train"}
    held_out_c = {r.identity for r in c if r.split != "train"}
    assert held_out_a and held_out_c and held_out_a != held_out_c


def test_hash_is_stable_across_processes():
    """Not Python's hash(): a fresh interpreter with another PYTHONHASHSEED gets the same number."""
    code = "from datasets_manifest.splits import identity_unit; print(repr(identity_unit('hdtf', 'JaneDoe', 3)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": "."}).stdout.strip()
    assert float(out) == identity_unit("hdtf", "JaneDoe", 3)
    assert 0.0 <= identity_unit("hdtf", "JaneDoe", 3) < 1.0
    assert identity_unit("hdtf", "JaneDoe", 3) != identity_unit("vfhq", "JaneDoe", 3)  # dataset is in the key


def test_adding_identities_keeps_old_assignments():
    small, _ = assign_splits(rows_for(100), "toy", seed=1)
    large, _ = assign_splits(rows_for(1000), "toy", seed=1)
    large_map = split_map(large)
    assert all(large_map[cid] == s for cid, s in split_map(small).items())


def test_small_datasets_go_to_the_largest_fraction():
    rows, _ = assign_splits(rows_for(MIN_IDENTITIES_FOR_HOLDOUT - 1), "toy", seed=0)
    assert {r.split for r in rows} == {"train"}
    rows, _ = assign_splits(rows_for(2), "toy", seed=0, split_fractions=(0.0, 0.0, 1.0))
    assert {r.split for r in rows} == {"test"}
    rows, _ = assign_splits(rows_for(MIN_IDENTITIES_FOR_HOLDOUT + 200), "toy", seed=0)
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_published_splits_are_honoured_and_renormalised():
    rows = rows_for(400)
    published = {}
    for r in rows:
        i = int(r.identity.removeprefix("person"))
        published[r.clip_id] = ("test",) if i < 100 else ("train", "val")
    out, notes = assign_splits(rows, "toy", seed=0, split_fractions=(0.9, 0.05, 0.05), published=published)
    for r in out:
        i = int(r.identity.removeprefix("person"))
        assert (r.split == "test") == (i < 100)
    dev_val = {r.identity for r in out if r.split == "val"}
    assert len(dev_val) / 300 == pytest.approx(0.05 / 0.95, abs=0.04)  # val share renormalised over dev
    assert notes == []


def test_conflicting_published_splits_go_to_the_most_held_out():
    rows = rows_for(1, clips_each=2)
    published = {rows[0].clip_id: ("train",), rows[1].clip_id: ("test",)}
    out, notes = assign_splits(rows, "toy", published=published)
    assert [r.split for r in out] == ["test", "test"]
    assert len(notes) == 1 and "person0" in notes[0] and "put in test" in notes[0]


def test_split_for_unit_edges():
    assert split_for_unit(0.0, (0.9, 0.05, 0.05)) == "train"
    assert split_for_unit(0.9, (0.9, 0.05, 0.05)) == "val"
    assert split_for_unit(0.951, (0.9, 0.05, 0.05)) == "test"
    assert split_for_unit(0.9999999, (0.9, 0.1, 0.0)) == "val"
    assert split_for_unit(0.5, (0.9, 0.05, 0.05), allowed=("test",)) == "test"


@pytest.mark.parametrize("bad", [(0.9, 0.1), (0.5, 0.5, 0.5), (1.1, -0.1, 0.0), (float("nan"), 0.5, 0.5)])
def test_bad_fractions_are_refused(bad):
    with pytest.raises(ValueError, match="split_fractions must be three non-negative numbers"):
        check_fractions(bad)
