"""Channel elements and their coupling: a union-find in which element 0 means "must stay".

Every prunable position (one row of a weight, one entry of a BatchNorm scale, one channel of an
activation) is an element. Operations that force two positions to be removed together union
their elements; anything that must keep its size is unioned with ``FIXED``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FIXED", "Elements", "Labels"]

FIXED = 0
Labels = dict[int, np.ndarray]  # tensor dim -> element id of each position along that dim


class Elements:
    """Union-find over element ids; the root of ``FIXED`` is always ``FIXED``."""

    def __init__(self) -> None:
        self._parent: list[int] = [FIXED]

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, n: int) -> np.ndarray:
        """``n`` fresh, uncoupled elements."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def fixed(self, n: int) -> np.ndarray:
        """``n`` positions that must all stay."""
        return np.zeros(n, dtype=np.int64)

    def find(self, e: int) -> int:
        parent = self._parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]  # path halving keeps later finds short
            e = parent[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == FIXED or (ra != FIXED and rb < ra):
            ra, rb = rb, ra
        self._parent[rb] = ra  # the smaller id (FIXED first) becomes the root

    def union_vectors(self, a: np.ndarray, b: np.ndarray) -> None:
        """Couple ``a[i]`` with ``b[i]`` for every position ``i``."""
        if a is b:
            return
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def fix(self, v: np.ndarray) -> None:
        """Mark every element of ``v`` as one that must stay."""
        for x in v.tolist():
            if x != FIXED:
                self.union(FIXED, x)

    def fix_labels(self, labels: Labels) -> None:
        for v in labels.values():
            self.fix(v)

    def roots(self, v: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(x) for x in v.tolist()), dtype=np.int64, count=len(v))

    def union_all(self, v: np.ndarray) -> None:
        """Couple every element of ``v`` with each other."""
        items = v.tolist()
        for x in items[1:]:
            self.union(items[0], x)
