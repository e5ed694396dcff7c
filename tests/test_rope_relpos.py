"""Rotary (EVA-02-like) and decomposed relative-position (SAM-ViT-like) attention.

RoPE rotates slot pairs of q and k by a per-position angle read from a sin / cos table, either
interleaved pairs ``(2i, 2i+1)`` or halves ``(i, i + D/2)``. A head_dim permutation of q / k is a
symmetry only if it moves whole pairs, the same way in q and k, *and* the table moves with them
(so only when the table is a state_dict tensor: different pairs have different frequencies). v
has no RoPE, so v and the output projection keep their own head_dim group either way.

SAM-ViT folds the heads into the batch, ``(B * heads, N, D)``, and adds a bias computed from q
and rel-pos tables shared by every head: heads may still be permuted together.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.spec import Axis, PermGroup, PermutationSpec
from helpers import float64_inputs


def rot_pairs(x):
    """Interleaved rotation (timm ``rot``): ``[x0, x1, x2, x3] -> [-x1, x0, -x3, x2]``."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rot_half(x):
    """Half rotation (timm ``rope_rotate_half``): ``[x0, x1, x2, x3] -> [-x2, -x3, x0, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RopeAttention(nn.Module):
    """timm ``EvaAttention``: q / k / v projections (or a fused qkv), RoPE on q and k past one
    prefix token from a ``(N, 2 * head_dim)`` sin | cos table, ``.type_as(v)``, sdpa, proj."""

    def __init__(self, dim=12, heads=2, tokens=5, half=False, table="buffer", fused=False):
        super().__init__()
        self.heads, self.half, self.fused = heads, half, fused
        head_dim = dim // heads
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        freqs = 1.0 / (10.0 ** torch.linspace(0, 1, head_dim // 2))
        ang = torch.arange(tokens - 1, dtype=torch.float32)[:, None] * freqs[None]
        sin, cos = ang.sin(), ang.cos()
        if half:
            sin, cos = torch.cat([sin, sin], -1), torch.cat([cos, cos], -1)
        else:
            sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
        emb = torch.cat([sin, cos], -1)
        if table == "param":
            self.rope = nn.Parameter(emb)
        else:
            self.register_buffer("rope", emb, persistent=(table == "persistent"))

    def _rotate(self, x):
        sin, cos = self.rope.chunk(2, -1)
        return x * cos + (rot_half(x) if self.half else rot_pairs(x)) * sin

    def forward(self, x):
        b, n, c = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        q = torch.cat([q[:, :, :1], self._rotate(q[:, :, 1:])], dim=2).type_as(v)
        k = torch.cat([k[:, :, :1], self._rotate(k[:, :, 1:])], dim=2).type_as(v)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def get_rel_pos(q_size, k_size, rel_pos):
    coords = torch.arange(q_size)[:, None] - torch.arange(k_size)[None, :] + (k_size - 1)
    return rel_pos[coords.long()]


class RelPosAttention(nn.Module):
    """timm ``vision_transformer_sam.Attention``: fused qkv folded to ``(3, B * heads, N, D)``,
    a decomposed rel-pos bias from ``rel_pos_h`` / ``rel_pos_w`` shared by all heads, sdpa."""

    def __init__(self, dim=12, heads=3, hw=(3, 2)):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * hw[0] - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.randn(2 * hw[1] - 1, dim // heads))

    def forward(self, x):
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x.reshape(b, n, -1)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.heads, n, -1).unbind(0)
        r_q = q.reshape(q.shape[0], h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(-1, n, n)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, -1)
        return self.proj(y).view(b, h, w, -1)


def _layouts(group):
    return {(a.tensor, a.dim, a.offset, a.outer, a.inner) for a in group.axes}


def _group_on(spec, tensor, **layout):
    out = [g for g in spec.groups if any(a.tensor == tensor and all(getattr(a, k) == v for k, v in layout.items())
                                         for a in g.axes)]
    assert len(out) == 1, (tensor, layout, [g.name for g in spec.groups])
    return out[0]


def _sound(model, spec, x, seeds=3):
    m64 = autoperm.perturbed(model, 0)
    for seed in range(seeds):
        perms = autoperm.random_permutation(spec, seed, derangement=True)
        assert autoperm.check_equivalence(m64, spec, perms, float64_inputs((x,))) < 1e-9


def _change(model, spec, groups, x, seed=0):
    """Relative output change when only ``groups`` (no-fixed-point permutations) are applied."""
    sub = PermutationSpec(groups, [], dict(spec.shapes), dict(spec.tied))
    perms = autoperm.random_permutation(sub, seed, derangement=True)
    return autoperm.check_equivalence(autoperm.perturbed(model, seed), sub, perms, float64_inputs((x,)))


def _keep(group, pred):
    return PermGroup(group.name, group.size, [a for a in group.axes if pred(a)])


# ---------------------------------------------------------------- RoPE
@pytest.mark.parametrize("fused", [False, True])
def test_rope_with_non_persistent_table_keeps_heads_and_v_head_dim(fused):
    model, x = RopeAttention(fused=fused).eval(), torch.randn(2, 5, 12)
    spec = autoperm.trace(model, x)
    qw, vw = ("qkv.weight", "qkv.weight") if fused else ("q.weight", "v.weight")
    v_off = 24 if fused else 0
    heads = _group_on(spec, qw, dim=0, offset=0, inner=6)
    assert heads.size == 2 and ("proj.weight", 1, 0, 1, 6) in _layouts(heads)
    v_group = _group_on(spec, vw, dim=0, offset=v_off, outer=2, inner=1)
    assert v_group.size == 6 and ("proj.weight", 1, 0, 2, 1) in _layouts(v_group)
    # q / k head_dim: pairs have different frequencies and the table cannot be permuted
    assert not any(a.tensor == qw and a.offset == 0 and a.inner in (1, 2) and a.outer >= 2
                   for g in spec.groups for a in g.axes)
    assert any(f.tensor == qw and f.offset == 0 and "rope" in f.reason for f in spec.frozen)
    _sound(model, spec, x)


@pytest.mark.parametrize("table", ["persistent", "param"])
def test_interleaved_rope_with_state_dict_table_permutes_whole_pairs(table):
    model, x = RopeAttention(table=table).eval(), torch.randn(2, 5, 12)
    spec = autoperm.trace(model, x)
    qk = _group_on(spec, "q.weight", dim=0, offset=0, outer=2, inner=2)
    assert qk.size == 3  # 3 rotation pairs per head, one permutation for every head of q and k
    assert {("q.weight", 0, 0, 2, 2), ("q.bias", 0, 0, 2, 2), ("k.weight", 0, 0, 2, 2),
            ("rope", 1, 0, 1, 2), ("rope", 1, 6, 1, 2)} == _layouts(qk)
    assert _group_on(spec, "v.weight", dim=0, outer=2, inner=1).size == 6
    _sound(model, spec, x)
    # negative controls: the table left alone, k left alone, or a swap inside every pair
    assert _change(model, spec, [_keep(qk, lambda a: a.tensor != "rope")], x) > 1e-3
    assert _change(model, spec, [_keep(qk, lambda a: not a.tensor.startswith("k."))], x) > 1e-3
    swap = PermGroup("swap", 2, [Axis(t, 0, 0, 6, 1) for t in ("q.weight", "q.bias", "k.weight")]
                     + [Axis("rope", 1, o, 3, 1) for o in (0, 6)])
    assert _change(model, spec, [swap], x) > 1e-3


def test_half_rope_with_state_dict_table_permutes_pairs_in_both_halves():
    model, x = RopeAttention(half=True, table="persistent").eval(), torch.randn(2, 5, 12)
    spec = autoperm.trace(model, x)
    qk = _group_on(spec, "k.weight", dim=0, offset=0, inner=1)
    assert qk.size == 3  # pairs (i, i + 3) of a 6-dim head
    assert {(a.offset, a.outer, a.inner) for a in qk.axes if a.tensor == "q.weight"} == \
        {(0, 1, 1), (3, 1, 1), (6, 1, 1), (9, 1, 1)}
    _sound(model, spec, x)
    # a permutation of the first half only splits pairs: the output changes
    assert _change(model, spec, [_keep(qk, lambda a: a.offset % 6 == 0)], x) > 1e-3


def test_rope_pair_permutation_is_wrong_when_the_table_is_not_permuted():
    """Why the EVA-02 q / k head_dim is frozen: moving whole pairs of q and k (same way) but not
    the table they are rotated by changes the output (pairs have different frequencies)."""
    model, x = RopeAttention(table="persistent").eval(), torch.randn(2, 5, 12)
    spec = autoperm.trace(model, x)
    qk = _group_on(spec, "q.weight", dim=0, offset=0, outer=2, inner=2)
    assert _change(model, spec, [_keep(qk, lambda a: a.tensor != "rope")], x, seed=1) > 1e-3


# ---------------------------------------------------------------- decomposed rel-pos
def test_sam_rel_pos_attention_has_head_and_head_dim_groups():
    model, x = RelPosAttention().eval(), torch.randn(2, 3, 2, 12)
    spec = autoperm.trace(model, x)
    heads = _group_on(spec, "qkv.weight", dim=0, offset=0, inner=4)
    assert heads.size == 3
    assert {("qkv.weight", 0, o, 1, 4) for o in (0, 12, 24)} | {("proj.weight", 1, 0, 1, 4)} <= _layouts(heads)
    qk = _group_on(spec, "rel_pos_h", dim=1)
    assert qk.size == 4 and {("qkv.weight", 0, 0, 3, 1), ("qkv.weight", 0, 12, 3, 1),
                             ("rel_pos_w", 1, 0, 1, 1)} <= _layouts(qk)
    v = _group_on(spec, "qkv.weight", dim=0, offset=24, outer=3)
    assert v.size == 4 and ("proj.weight", 1, 0, 3, 1) in _layouts(v)
    assert all(f.tensor.startswith("rel_pos") or f.reason.startswith("model") for f in spec.frozen)
    _sound(model, spec, x)
    # negative controls: heads of q alone, and the q / k head_dim without the shared tables
    assert _change(model, spec, [_keep(heads, lambda a: a.tensor == "qkv.weight" and a.offset == 0)], x) > 1e-3
    assert _change(model, spec, [_keep(qk, lambda a: not a.tensor.startswith("rel_pos"))], x) > 1e-3


# ---------------------------------------------------------------- the rules on their own
class PairDiff(nn.Module):
    """``b(h[::2] - h[1::2])`` (pairs), or ``b(h[start::step])`` for other steps."""

    def __init__(self, width=8, step=2, start=0):
        super().__init__()
        self.step, self.start = step, start
        self.a, self.b = nn.Linear(4, width), nn.Linear(math.ceil((width - start) / step), 3)

    def forward(self, x):
        h = self.a(x)
        if self.step == 2:
            return self.b(h[..., ::2] - h[..., 1::2])
        return self.b(h[..., self.start::self.step])


def test_strided_slice_makes_rows_of_the_step():
    model, x = PairDiff().eval(), torch.randn(3, 4)
    spec = autoperm.trace(model, x)
    g = _group_on(spec, "a.weight", dim=0)
    assert g.size == 4 and _layouts(g) == {("a.weight", 0, 0, 1, 2), ("a.bias", 0, 0, 1, 2), ("b.weight", 1, 0, 1, 1)}
    _sound(model, spec, x)
    swap = PermGroup("swap", 2, [Axis("a.weight", 0, 0, 4, 1), Axis("a.bias", 0, 0, 4, 1)])
    assert _change(model, spec, [swap], x) > 1e-3  # the phase within a row is fixed


def test_strided_slice_that_does_not_cover_every_row_freezes():
    model, x = PairDiff(width=8, step=3, start=1).eval(), torch.randn(3, 4)
    spec = autoperm.trace(model, x)
    assert not any(a.tensor == "a.weight" and a.dim == 0 for g in spec.groups for a in g.axes)
    _sound(model, spec, x)


class CastLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 5), nn.Linear(6, 3)

    def forward(self, x):
        v = self.b(x)
        return self.c(torch.relu(self.a(x)).type_as(v)) + v.sum(-1, keepdim=True)


def test_type_as_ties_only_self():
    model, x = CastLike().eval(), torch.randn(3, 4)
    spec = autoperm.trace(model, x)
    assert _group_on(spec, "a.weight", dim=0).size == 6
    assert _group_on(spec, "b.weight", dim=0).size == 5
    _sound(model, spec, x)
