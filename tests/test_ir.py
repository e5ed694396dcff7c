"""The atom union-find: structure unification, refinement, freezing, layouts."""

from __future__ import annotations

import sympy

from autoperm.ir import AtomTable


def leaves(t, a):
    frozen = t.frozen_closure()
    return [(b.size, b.offset, b.outer, b.inner, b.frozen is not None) for b in t.blocks(a, frozen) if b.size > 1]


def test_prod_refinement_nests_factorizations():
    t = AtomTable()
    a, b = t.new(64), t.new(64)
    t.compose(a, "prod", [t.new(4), t.new(16)])
    t.compose(b, "prod", [t.new(8), t.new(8)])
    t.tie(a, b)
    assert leaves(t, a) == [(4, 0, 1, 16, False), (2, 0, 4, 8, False), (8, 0, 8, 1, False)]


def test_sum_refinement_merges_cut_points():
    t = AtomTable()
    a, b = t.new(6), t.new(6)
    t.compose(a, "sum", [t.new(2), t.new(4)])
    t.compose(b, "sum", [t.new(3), t.new(3)])
    t.tie(a, b)
    assert [(s, o) for s, o, *_ in leaves(t, a)] == [(2, 0), (3, 3)], "cuts at 2, 3: a size-1 piece stays"


def test_sum_of_equal_parts_against_prod_shares_rows():
    t = AtomTable()
    a, b = t.new(6), t.new(6)
    parts = [t.new(3), t.new(3)]
    t.compose(a, "sum", parts)
    t.compose(b, "prod", [t.new(2), t.new(3)])
    t.tie(a, b)
    assert t.find(parts[0]) == t.find(parts[1]), "both halves share the row permutation"
    assert leaves(t, a) == [(3, 0, 2, 1, False)], "the row index (size 2) cannot move"


def test_incompatible_structures_freeze():
    t = AtomTable()
    a, b = t.new(24), t.new(24)
    ka, kb = [t.new(6), t.new(4)], [t.new(4), t.new(6)]
    t.compose(a, "prod", ka)
    t.compose(b, "prod", kb)
    t.tie(a, b)
    assert all(f for *_, f in leaves(t, a))
    assert all(t.find(k) in t.frozen_closure() for k in ka + kb)


def test_freezing_a_class_freezes_its_parts_only():
    t = AtomTable()
    a, h, w = t.new(12), t.new(3), t.new(4)
    t.compose(a, "prod", [h, w])
    t.freeze(h, "test")
    assert leaves(t, a) == [(3, 0, 1, 4, True), (4, 0, 3, 1, False)]
    t.freeze(a, "all")
    assert all(f for *_, f in leaves(t, a))


def test_symbolic_batch_refines_with_heads():
    s = sympy.Symbol("s0", positive=True, integer=True)
    t = AtomTable()
    a, b = t.new(8 * s), t.new(8 * s)
    batch, e = t.new(s), t.new(8)
    t.compose(a, "prod", [batch, e])
    t.compose(b, "prod", [t.new(2 * s), t.new(4)])
    t.tie(a, b)
    assert [blk.size for blk in t.blocks(e, {})] == [2, 4], "E = prod(heads, head_dim)"
