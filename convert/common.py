"""Helpers shared by the DiT, umT5 and VAE layout modules."""

from __future__ import annotations

import re

import numpy as np


def _abbrev(items: list[str], limit: int = 12) -> list[str]:
    return items if len(items) <= limit else [*items[:limit], f"... ({len(items) - limit} more)"]


def rename(key: str, renames: list[tuple[str, str]]) -> str:
    """key after the first (pattern, replacement) of renames that matches it; unchanged if none does."""
    for pattern, repl in renames:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def key_problems(tensors: dict[str, np.ndarray], want: dict[str, tuple[int, ...]],
                 *extra: tuple[str, list[str]]) -> list[str]:
    """'N missing: ...', 'N unexpected: ...', 'N with the wrong shape: ...', then each (what, items) of extra, for
    every kind that has items; empty when the checkpoint matches."""
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    bad = [f"{k}: {tuple(tensors[k].shape)} (expected {want[k]})"
           for k in sorted(set(want) & set(tensors)) if tuple(tensors[k].shape) != want[k]]
    kinds = (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", bad), *extra)
    return [f"{len(items)} {what}: {', '.join(_abbrev(items))}" for what, items in kinds if items]


def nest(flat: dict[tuple, np.ndarray]) -> dict:
    """{(a, b, c): x} -> {a: {b: {c: x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def module_tree(named: dict[str, np.ndarray], table: dict[str, tuple[str, ...]],
                direct: dict[str, tuple[str, ...]] | None = None) -> dict:
    """{'module.leaf': x} -> a nested tree with x at (*table[module], leaf), or at direct[name] for the names there."""
    flat = {}
    for name, value in named.items():
        if direct and name in direct:
            flat[direct[name]] = value
            continue
        module, leaf = name.rsplit(".", 1)
        flat[(*table[module], leaf)] = value
    return nest(flat)
