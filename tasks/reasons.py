"""Reasons as people read them: one line, never cut mid-word."""
from __future__ import annotations


def shorten(text: str, limit: int = 200) -> str:
    """`text` within `limit` characters, cut at the last clause (";", ", ", ". ") or word before it, never mid-word,
    with "..." (the whole text stays in the record or artifact that holds it)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[:limit - 3]
    for sep in ("; ", ". ", ", ", " "):
        cut = head.rfind(sep)
        if cut > limit // 3:
            return head[:cut].rstrip(" ;,.") + "..."
    return head + "..."
