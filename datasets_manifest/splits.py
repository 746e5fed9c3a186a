"""Deterministic, identity-disjoint train/val/test splits.

Rule:
- Every identity gets a number u in [0, 1) from BLAKE2b over "dataset \\x1f identity \\x1f seed" (stable
  across processes and Python versions, unlike hash()). Its split is the first whose cumulative fraction
  exceeds u. All clips of an identity share its split, so no identity is in two splits, and an identity's
  split never changes when other identities are added (a growing manifest keeps its old assignments).
- A split the dataset publishes is honoured: a clip may carry the splits its release allows (VoxCeleb2
  test -> ("test",); dev -> ("train", "val")); the fractions are renormalised over the allowed splits. An
  identity published in two different ways is put in the most held-out of them (test > val > train), so a
  published test set never leaks into training; the build notes say so.
- Small groups: when a group of identities sharing the same allowed splits has fewer than
  MIN_IDENTITIES_FOR_HOLDOUT identities, all of it goes to the allowed split with the largest fraction
  (train with the default fractions). Holding out 1 of 2 people makes no useful val set and starves train.
"""
from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from datasets_manifest.schema import SPLITS, ClipRow

MIN_IDENTITIES_FOR_HOLDOUT = 20
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
_HELD_OUT_ORDER = ("test", "val", "train")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}")
    return fr  # type: ignore[return-value]


def identity_unit(dataset: str, identity: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for one identity of one dataset under one seed."""
    digest = hashlib.blake2b(f"{dataset}\x1f{identity}\x1f{seed}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_for_unit(u: float, fractions: Sequence[float], allowed: Sequence[str] = SPLITS) -> str:
    """The split whose cumulative (renormalised over `allowed`) fraction first exceeds u."""
    weights = [(s, fractions[SPLITS.index(s)]) for s in SPLITS if s in allowed]
    total = sum(w for _, w in weights)
    if total <= 0:
        return weights[0][0]
    acc = 0.0
    for split, w in weights:
        acc += w / total
        if u < acc:
            return split
    return [s for s, w in weights if w > 0][-1]  # u within float rounding of 1.0


def _largest(fractions: Sequence[float], allowed: Sequence[str]) -> str:
    return max((s for s in SPLITS if s in allowed), key=lambda s: (fractions[SPLITS.index(s)], -SPLITS.index(s)))


def assign_splits(
    rows: Iterable[ClipRow],
    dataset: str,
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    published: Mapping[str, Sequence[str]] | None = None,
) -> tuple[list[ClipRow], list[str]]:
    """Rows with `split` set (same order), plus notes on any published-split conflicts."""
    fractions = check_fractions(split_fractions)
    rows = list(rows)
    published = published or {}
    notes: list[str] = []
    allowed_by_identity: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for row in rows:
        allowed_by_identity[row.identity].add(tuple(published.get(row.clip_id, SPLITS)))

    allowed: dict[str, tuple[str, ...]] = {}
    for identity, options in allowed_by_identity.items():
        common = set(SPLITS).intersection(*options)
        if common:
            allowed[identity] = tuple(s for s in SPLITS if s in common)
        else:
            union = set().union(*options)
            pick = next(s for s in _HELD_OUT_ORDER if s in union)
            allowed[identity] = (pick,)
            notes.append(f"identity {identity!r} is published in conflicting splits {sorted(options)}; put in {pick}")

    group_sizes: dict[tuple[str, ...], int] = defaultdict(int)
    for options in allowed.values():
        group_sizes[options] += 1

    split_of: dict[str, str] = {}
    for identity, options in allowed.items():
        if group_sizes[options] < MIN_IDENTITIES_FOR_HOLDOUT:
            split_of[identity] = _largest(fractions, options)
        else:
            split_of[identity] = split_for_unit(identity_unit(dataset, identity, seed), fractions, options)
    return [row.model_copy(update={"split": split_of[row.identity]}) for row in rows], notes
