"""The internal IR of the analysis: channel atoms in a union-find with structure.

Every dim of every tensor value in the traced graph is one *atom* (an integer id) of a known
size. Rules relate atoms by three constraints:

* `Tie(a, b)`: a and b are the same index space; one permutation must act on both.
* `Freeze(a, reason)`: a may only take the identity permutation.
* `Compose(a, kind, parts)`: a is made of smaller atoms, either row-major (``kind="prod"``:
  a flattened ``C*H*W`` is ``prod(C, H, W)``) or concatenated (``kind="sum"``: a cat of 32 and
  16 channels is ``sum(A, B)``).

Each union-find class carries at most one structure. Tying two structured classes unifies their
structures: the same part sizes tie part by part; different sizes of the same kind are refined to
the common refinement (``prod(4, 16)`` and ``prod(8, 8)`` both become ``prod(4, 2, 8)``); anything
else (``prod`` against ``sum``, or factorizations that do not nest) freezes the class. Refinement
only ever restricts the permutations allowed, so it is sound.

A permutation of a class acts on its leaves: a frozen class freezes every part below it. Sizes
strictly decrease from a class to its parts (parts of size 1 are dropped and a single part is a
tie), so structures are acyclic.

Pure data: this module imports neither torch nor torch.fx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .errors import AnalysisError

__all__ = ["Tie", "Freeze", "Compose", "Constraint", "AtomTable", "Block"]

Size = Any  # an int, or a sympy expression for symbolic (batch) sizes


@dataclass(frozen=True)
class Tie:
    a: int
    b: int


@dataclass(frozen=True)
class Freeze:
    a: int
    reason: str


@dataclass(frozen=True)
class Compose:
    a: int
    kind: str  # "prod" or "sum"
    parts: tuple[int, ...]


Constraint = Tie | Freeze | Compose


@dataclass(frozen=True)
class Block:
    """One leaf class inside an atom, with its layout (see `autoperm.spec.Axis`)."""

    leaf: int
    size: int
    offset: int
    outer: int
    inner: int
    frozen: str | None


def _prod(sizes: Sequence[Size]) -> Size:
    out: Size = 1
    for s in sizes:
        out = out * s
    return out


def _same(x: Size, y: Size) -> bool:
    if _is_int(x) and _is_int(y):
        return int(x) == int(y)
    import sympy

    return sympy.expand(sympy.sympify(x) - sympy.sympify(y)) == 0


def _is_int(s: Size) -> bool:
    return isinstance(s, int) or (hasattr(s, "is_Integer") and bool(s.is_Integer))


def _arithmetic(s: Size) -> bool:
    """A size computed from symbols (``s // 2``, ``s * (6 // s)``), not a number nor a bare symbol:
    a mismatch against it may be arithmetic the rule cannot see through. A bare batch symbol
    tied to a number is a rule bug and stays an `AnalysisError`."""
    return not _is_int(s) and not bool(getattr(s, "is_Symbol", False))


class SymbolicSizeError(AnalysisError):
    """Two sizes a rule ties are not provably equal, and one of them is arithmetic on symbols
    (``s // 2`` when a batch is split in halves): the node's dims are frozen instead
    (`autoperm.analysis`)."""


class AtomTable:
    """Union-find over atoms with sizes, structures and freeze reasons."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[Size] = []
        self._struct: dict[int, tuple[str, list[int]]] = {}
        self._frozen: dict[int, str] = {}
        self._pending: list[tuple[int, int]] = []

    # ------------------------------------------------------------ basics
    def new(self, size: Size) -> int:
        """A fresh atom of ``size``."""
        self._parent.append(len(self._parent))
        self._size.append(int(size) if _is_int(size) else size)
        return len(self._parent) - 1

    def __len__(self) -> int:
        return len(self._parent)

    def size(self, a: int) -> Size:
        return self._size[a]

    def find(self, a: int) -> int:
        root = a
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[a] != root:
            self._parent[a], a = root, self._parent[a]
        return root

    def frozen_reason(self, a: int) -> str | None:
        return self._frozen.get(self.find(a))

    def parts(self, a: int) -> tuple[str, list[int]] | None:
        return self._struct.get(self.find(a))

    # ------------------------------------------------------------ constraints
    def apply(self, c: Constraint) -> None:
        if isinstance(c, Tie):
            self.tie(c.a, c.b)
        elif isinstance(c, Freeze):
            self.freeze(c.a, c.reason)
        elif isinstance(c, Compose):
            self.compose(c.a, c.kind, c.parts)
        else:
            raise AnalysisError(f"unknown constraint {c!r}")

    def freeze(self, a: int, reason: str) -> None:
        self._frozen.setdefault(self.find(a), reason)

    def compose(self, a: int, kind: str, parts: Sequence[int]) -> None:
        """Impose ``a = kind(parts)``; parts of size 1 (prod) or 0 (sum) are dropped."""
        if kind not in ("prod", "sum"):
            raise AnalysisError(f"unknown composition kind {kind!r}")
        unit = 1 if kind == "prod" else 0
        kept = [p for p in parts if self._size[p] != unit]
        total = _prod([self._size[p] for p in kept]) if kind == "prod" else sum(self._size[p] for p in kept)
        if not _same(total, self._size[a]):
            err = SymbolicSizeError if _arithmetic(total) or _arithmetic(self._size[a]) else AnalysisError
            raise err(f"composition {kind}{[self._size[p] for p in kept]} does not "
                      f"match atom size {self._size[a]}")
        if len(kept) <= 1:
            if kept:
                self.tie(a, kept[0])
            return
        b = self.new(self._size[a])
        self._struct[b] = (kind, list(kept))
        self.tie(a, b)

    def tie(self, a: int, b: int) -> None:
        if not _same(self._size[a], self._size[b]):
            err = SymbolicSizeError if _arithmetic(self._size[a]) or _arithmetic(self._size[b]) else AnalysisError
            raise err(f"cannot tie atoms of sizes {self._size[a]} and {self._size[b]}")
        self._pending.append((a, b))
        while self._pending:
            x, y = self._pending.pop()
            self._union(x, y)

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self._parent[rb] = ra
        if rb in self._frozen:
            self._frozen.setdefault(ra, self._frozen.pop(rb))
        sa, sb = self._struct.pop(ra, None), self._struct.pop(rb, None)
        merged = self._merge(ra, sa, sb)
        if merged is not None:
            self._struct[ra] = merged

    def _merge(self, r: int, sa, sb):
        if sa is None or sb is None:
            return sa if sb is None else sb
        (ka, ca), (kb, cb) = sa, sb
        sizes_a, sizes_b = [self._size[c] for c in ca], [self._size[c] for c in cb]
        if ka == kb and len(sizes_a) == len(sizes_b) and all(map(_same, sizes_a, sizes_b)):
            self._pending.extend(zip(ca, cb))
            return sa
        refined = None
        if ka == kb and (ka == "prod" or all(_is_int(s) for s in sizes_a + sizes_b)):
            refined = _refine(ka, sizes_a, sizes_b)
        if refined is None and {ka, kb} == {"sum", "prod"}:
            sums, prods = (ca, cb) if ka == "sum" else (cb, ca)
            if self._sum_over_prod(sums, prods):
                return ("prod", prods)
        if refined is None:
            reason = f"incompatible reshapes of one channel dim ({ka}{sizes_a} vs {kb}{sizes_b})"
            self._frozen.setdefault(r, reason)
            for c in cb:  # parts of the dropped structure are frozen with their parent
                self._frozen.setdefault(self.find(c), reason)
            return sa
        atoms = [self.new(s) for s in refined]
        for children in (ca, cb):
            i = 0
            for c in children:
                cover, acc = [], 1 if ka == "prod" else 0
                while not _same(acc, self._size[c]):
                    cover.append(atoms[i])
                    acc = acc * refined[i] if ka == "prod" else acc + refined[i]
                    i += 1
                if len(cover) == 1:
                    self._pending.append((c, cover[0]))
                else:
                    nb = self.new(self._size[c])
                    self._struct[nb] = (ka, cover)
                    self._pending.append((c, nb))
        return (ka, atoms)

    def _sum_over_prod(self, sums: list[int], prods: list[int]) -> bool:
        """Unify ``sum(parts)`` with ``prod(f, *rest)`` when every part spans whole rows of
        ``rest``: ``f`` becomes ``sum(m_1, ..)`` and part i becomes ``prod(m_i, *rest)`` (all parts
        share the permutation of ``rest``; rows never cross parts). Returns False if they do not fit.
        """
        rest = prods[1:]
        inner = _prod([self._size[c] for c in rest])
        if not _is_int(inner) or not all(_is_int(self._size[p]) for p in sums):
            return False
        inner = int(inner)
        if any(int(self._size[p]) % inner for p in sums):
            return False
        rows = [self.new(int(self._size[p]) // inner) for p in sums]
        head = self.new(self._size[prods[0]])
        self._struct[head] = ("sum", rows)
        self._pending.append((prods[0], head))
        for part, row in zip(sums, rows):
            kids = ([row] if self._size[row] != 1 else []) + rest
            if len(kids) == 1:
                self._pending.append((part, kids[0]))
            else:
                nb = self.new(self._size[part])
                self._struct[nb] = ("prod", kids)
                self._pending.append((part, nb))
        return True

    # ------------------------------------------------------------ read-out
    def frozen_closure(self) -> dict[int, str]:
        """Every class that must stay fixed: frozen itself, or a part of a frozen class."""
        out: dict[int, str] = {}
        stack = [(self.find(a), r) for a, r in self._frozen.items()]
        while stack:
            r, reason = stack.pop()
            r = self.find(r)
            if r in out:
                continue
            out[r] = reason
            st = self._struct.get(r)
            if st:
                stack.extend((self.find(c), reason) for c in st[1])
        return out

    def blocks(self, a: int, frozen: dict[int, str]) -> Iterator[Block]:
        """The leaf classes of atom ``a`` with their layouts inside it (none for symbolic sizes)."""
        r = self.find(a)
        size = self._size[r]
        if not _is_int(size):  # a symbolic (batch-dependent) dim holds no layout of fixed slots
            return
        st = self._struct.get(r)
        if st is None:
            yield Block(r, int(size), 0, 1, 1, frozen.get(r))
            return
        kind, children = st
        if kind == "sum":
            off = 0
            for c in children:
                for b in self.blocks(c, frozen):
                    yield Block(b.leaf, b.size, off + b.offset, b.outer, b.inner, b.frozen)
                off += int(self._size[c])
            return
        sizes = [int(self._size[c]) for c in children]
        for i, c in enumerate(children):
            pre, post, s_i = math.prod(sizes[:i]), math.prod(sizes[i + 1:]), sizes[i]
            for b in self.blocks(c, frozen):
                if b.offset == 0 and b.outer * b.size * b.inner == s_i:
                    yield Block(b.leaf, b.size, 0, pre * b.outer, b.inner * post, b.frozen)
                else:
                    for k in range(pre):
                        yield Block(b.leaf, b.size, k * s_i * post + b.offset * post, b.outer,
                                    b.inner * post, b.frozen)


def _hint(s: Size) -> float:
    """A number to order sizes by; symbols (the batch) count as large."""
    if _is_int(s):
        return float(s)
    return float(s.subs({sym: 10007 for sym in s.free_symbols}))


def _ratio(x: Size, y: Size) -> Size | None:
    """``y / x`` when x divides y (as integers, or as polynomials in the symbols), else None."""
    if _is_int(x) and _is_int(y):
        return int(y) // int(x) if int(y) % int(x) == 0 else None
    import sympy

    num, den = sympy.fraction(sympy.cancel(sympy.sympify(y) / sympy.sympify(x)))
    if den == 1 and num.is_Integer:
        return int(num)
    if den != 1 or not all(c.is_Integer for c in sympy.Poly(num).coeffs()):
        return None
    return int(num) if num.is_Integer else num


def _refine(kind: str, a: list[Size], b: list[Size]) -> list[Size] | None:
    """The common refinement of two compositions of one size, or None if they do not nest."""
    if kind == "sum":
        cuts = sorted(set(_cumsum(a)) | set(_cumsum(b)))
        return [y - x for x, y in zip([0] + cuts[:-1], cuts)]
    strides = sorted(set(_suffix_products(a)) | set(_suffix_products(b)), key=_hint)
    ratios = [_ratio(x, y) for x, y in zip(strides, strides[1:])]
    if any(r is None or r == 1 for r in ratios):
        return None
    return ratios[::-1]


def _cumsum(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def _suffix_products(xs: list[int]) -> list[int]:
    out, acc = [1], 1
    for x in reversed(xs):
        acc *= x
        out.append(acc)
    return out
