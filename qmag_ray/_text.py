"""Wording shared by log lines and messages."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``1 shard``, ``3 shards``, ``0 shards``: ``n`` and the noun, plural unless ``n`` is 1.

    Regular nouns only (a trailing ``s``); every caller passes one.
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
