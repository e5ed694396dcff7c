"""Hierarchical groups: one head_dim permutation per attention head (`autoperm.hierarchy`).

The oracle is functional equivalence in float64 with every parameter randomized, under random
permutations that differ from head to head. Negative controls: in models where some op reads the
head_dim features of several heads at once, the analysis must keep the head_dim shared, and
forcing per-head permutations there must change the output.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.errors import PermutationError, SpecError
from autoperm.permute import compose, invert, permute, random_permutation
from autoperm.verify import check_equivalence, perturbed


class SplitHeads(nn.Module):
    """q / k / v projections, heads split by view, SDPA; ``mode`` adds an op that mixes heads."""

    def __init__(self, dim=16, heads=4, mode="ok"):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.qn = nn.LayerNorm(dim // heads)
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.mode == "shared_norm":  # one LayerNorm(head_dim) weight for every head
            q, k = self.qn(q), self.qn(k)
        elif self.mode == "mean_heads":  # head_dim features averaged over the heads
            q = q + q.mean(1, keepdim=True)
        elif self.mode == "softmax_heads":  # normalized across heads, per head_dim slot
            q = q.softmax(1)
        elif self.mode == "cross_heads":  # every pair of heads compared on head_dim
            q = q * torch.einsum("bhnd,bgnd->bhn", q, k).unsqueeze(-1)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.fc(self.o(o.transpose(1, 2).reshape(b, n, d)).relu())


class FusedQKV(nn.Module):
    """timm-style attention: one qkv projection reshaped to (3, B, heads, N, head_dim)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj, self.fc = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.fc(x + self.proj(o.transpose(1, 2).reshape(b, n, d)))


class TorchMHA(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(dim, heads, batch_first=True), nn.Linear(dim, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0].relu())


def _x():
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def _children(spec):
    return {g.name: g.parent for g in spec.groups if g.parent}


@pytest.mark.parametrize("factory", [SplitHeads, FusedQKV, TorchMHA], ids=["split", "fused_qkv", "torch_mha"])
def test_per_head_permutations_keep_the_function(factory):
    model = factory().eval()
    spec = autoperm.trace(model, _x(), hierarchical=True)  # verify=True draws per-head permutations
    kids = _children(spec)
    heads = [g for g in spec.groups if g.size == 4 and g.parent is None and g.name in kids.values()]
    assert len(heads) == 1, spec.groups
    assert set(kids.values()) == {heads[0].name}
    assert len(kids) == 2  # q/k head_dim and v/o head_dim
    m64 = perturbed(model, seed=3)
    for seed in range(3):
        perms = random_permutation(spec, seed=seed, derangement=True)
        for name in kids:
            assert perms[name].shape == (4, 4)
            assert len({tuple(r.tolist()) for r in perms[name]}) > 1  # really different per head
        assert check_equivalence(m64, spec, perms, (_x().double(),)) < 1e-10
    assert not any(g.parent for g in autoperm.trace(model, _x(), verify=False).groups)  # opt-in


@pytest.mark.parametrize("mode", ["shared_norm", "mean_heads", "softmax_heads", "cross_heads"])
def test_ops_that_mix_heads_keep_head_dim_shared(mode):
    model = SplitHeads(mode=mode).eval()
    spec = autoperm.trace(model, _x(), hierarchical=True)
    flat_ok = autoperm.trace(SplitHeads().eval(), _x(), hierarchical=True)
    qk = next(g for g in flat_ok.groups if g.parent and any(a.tensor == "q.weight" for a in g.axes)).name
    assert spec.group(qk).parent is None  # q/k head_dim stays shared
    assert spec.group("v").parent == "q"  # the value path is untouched by the mixing op
    # negative control: forcing one q/k permutation per head does change the function
    forced = copy.deepcopy(spec)
    forced.group(qk).parent = "q"
    if mode == "shared_norm":  # the shared LayerNorm(head_dim) weight cannot even be named per head
        with pytest.raises(SpecError, match="qn.weight"):
            forced.validate()
        return
    forced.validate()
    perms = autoperm.identity_permutation(forced)
    perms[qk] = random_permutation(forced, seed=1, derangement=True)[qk]
    assert check_equivalence(perturbed(model, seed=3), forced, perms, (_x().double(),)) > 1e-3


def test_invert_and_compose_respect_the_parent():
    model = perturbed(SplitHeads().eval(), seed=1)
    spec = autoperm.trace(model, _x().double(), hierarchical=True)
    p1, p2 = (random_permutation(spec, seed=s, derangement=True) for s in (4, 5))
    twice = permute(permute(model, spec, p1), spec, p2)
    once = permute(model, spec, compose(p1, p2, spec))
    for k, v in twice.state_dict().items():
        assert torch.equal(v, once.state_dict()[k]), k
    back = permute(permute(model, spec, p1), spec, invert(p1, spec))
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(PermutationError, match="spec="):
        invert(p1)


def test_spec_json_and_validation_of_children(tmp_path):
    spec = autoperm.trace(SplitHeads().eval(), _x(), hierarchical=True)
    spec.save(tmp_path / "s.json")
    again = autoperm.PermutationSpec.load(tmp_path / "s.json")
    assert _children(again) == _children(spec)
    child = next(iter(_children(spec)))
    bad = copy.deepcopy(spec)
    bad.group(child).parent = "nope"
    with pytest.raises(SpecError, match="nope"):
        bad.validate()
    bad = copy.deepcopy(spec)
    bad.group(child).parent = "o"  # o's units are not laid out in head-sized chunks
    with pytest.raises(SpecError, match="child group"):
        bad.validate()
    perms = random_permutation(spec, seed=0)
    perms[child] = perms[child][:3]
    with pytest.raises(PermutationError, match=f"{child}.*has shape"):
        permute(SplitHeads(), spec, perms)


def test_soft_matchers_take_a_hierarchical_spec_as_shared():
    a, b = SplitHeads().eval(), SplitHeads().eval()
    spec = autoperm.trace(a, _x(), hierarchical=True)
    al = autoperm.match(a, b, spec=spec, method="sinkhorn", steps=5)
    assert all(p.dim() == 1 for p in al.perms.values())  # one head_dim permutation for all heads
    merged = autoperm.merge(a, b, spec=spec, alignment=al)
    assert torch.isfinite(merged(_x())).all()


@pytest.mark.parametrize("method", ["weight", "activation"])
@pytest.mark.parametrize("factory", [SplitHeads, FusedQKV, TorchMHA], ids=["split", "fused_qkv", "torch_mha"])
def test_matching_recovers_per_head_permutations(factory, method):
    a = perturbed(factory().eval(), seed=1)
    spec = autoperm.trace(a, _x().double(), hierarchical=True)
    planted = random_permutation(spec, seed=7, derangement=True)
    b = permute(a, spec, planted)
    al = autoperm.match(a, b, spec, method=method, data=[_x().double() + i for i in range(3)])
    assert {n for n, p in al.perms.items() if p.dim() == 2} == set(_children(spec))
    back = permute(b, spec, al.perms).state_dict()
    for k, v in a.state_dict().items():
        assert torch.allclose(back[k], v, atol=1e-10), k
    merged = autoperm.merge(a, b, spec=spec, method=method, data=[_x().double() + i for i in range(3)])
    assert (merged(_x().double()) - a(_x().double())).abs().max() < 1e-9


def test_merge_many_with_per_head_permutations():
    a = perturbed(SplitHeads().eval(), seed=1)
    spec = autoperm.trace(a, _x().double(), hierarchical=True)
    copies = [permute(a, spec, random_permutation(spec, seed=s, derangement=True)) for s in (2, 3)]
    merged = autoperm.merge_many([a, *copies], spec=spec, method="weight")
    assert (merged(_x().double()) - a(_x().double())).abs().max() < 1e-9


def test_partial_merge_takes_per_head_alignments():
    a = perturbed(SplitHeads().eval(), seed=1)
    b = perturbed(SplitHeads().eval(), seed=2)
    spec = autoperm.trace(a, _x().double(), hierarchical=True)
    al = autoperm.match(a, b, spec, method="weight")
    assert any(p.dim() == 2 for p in al.perms.values())
    full = autoperm.merge(a, b, spec=spec, alignment=al)
    # partial merging folds the per-head rows into B first (absorb_children): gamma 0 is the full merge
    part = autoperm.merge(a, b, spec=spec, alignment=al, partial=0.0, example_inputs=_x().double())
    assert (full(_x().double()) - part(_x().double())).abs().max() < 1e-10
    naive = autoperm.merge(a, b, spec=spec, method="identity")
    assert (full(_x().double()) - naive(_x().double())).abs().max() > 1e-3  # the alignment mattered


ATTN_FILE = '''
import torch, torch.nn.functional as F
from torch import nn

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, 4, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.fc(self.o(o).relu().mean(1))

def make():
    return Attn()
'''


def test_cli_per_head_spec_and_merge(tmp_path, capsys):
    from autoperm.cli import main

    (tmp_path / "attn.py").write_text(ATTN_FILE)
    assert main(["spec", f"{tmp_path / 'attn.py'}:make", "--input-shape", "2,5,16", "--per-head", "--table",
                 "--out", str(tmp_path / "s.json")]) == 0
    assert "per slot of q: q#1, v" in capsys.readouterr().out
    assert {g.name: g.parent for g in autoperm.PermutationSpec.load(tmp_path / "s.json").groups
            if g.parent} == {"q#1": "q", "v": "q"}
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"m{seed}.pt")
        torch.save(SplitHeads().state_dict(), paths[-1])  # same tensor names as Attn, plus qn / fc
    sys_path = str(tmp_path)
    import sys

    sys.path.insert(0, sys_path)
    try:
        import attn
    finally:
        sys.path.remove(sys_path)
    models = []
    for p in paths:
        m = attn.make()
        m.load_state_dict({k: v for k, v in torch.load(p, weights_only=True).items() if not k.startswith("qn.")})
        torch.save(m.state_dict(), p)
        models.append(m.eval())
    out = tmp_path / "merged.pt"
    assert main(["merge", str(paths[0]), str(paths[1]), "--model", f"{tmp_path / 'attn.py'}:make",
                 "--input-shape", "2,5,16", "--per-head", "--out", str(out)]) == 0
    spec = autoperm.trace(models[0], torch.randn(2, 5, 16), hierarchical=True)
    want = autoperm.merge(models[0], models[1], spec=spec).state_dict()
    got = torch.load(out, weights_only=True)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    flat = autoperm.merge(models[0], models[1], example_inputs=torch.randn(2, 5, 16)).state_dict()
    assert not all(torch.allclose(got[k], flat[k], atol=1e-6) for k in flat)  # per-head alignment differs


class GroupedBlock(nn.Module):
    """ResNeXt-style: dense 1x1, grouped 3x3 (4 groups), dense 1x1 (``twice``: a second grouped conv
    reads the first one's within-group units, which must then be shared by all groups)."""

    def __init__(self, twice=False):
        super().__init__()
        self.twice = twice
        self.c1, self.b1 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c2b = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = self.b2(self.c2(self.b1(self.c1(x)).relu())).relu()
        if self.twice:
            y = self.c2b(y).relu()
        return self.fc((x + self.c3(y)).mean((2, 3)))


def test_grouped_conv_gets_one_permutation_per_group():
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    model = GroupedBlock().eval()
    spec = autoperm.trace(model, x, hierarchical=True)
    assert _children(spec) == {"c2": "c1"}  # c2's 4 units per group, one permutation per group
    m64 = perturbed(model, seed=2)
    perms = random_permutation(spec, seed=3, derangement=True)
    assert perms["c2"].shape == (4, 4)
    assert check_equivalence(m64, spec, perms, (x.double(),)) < 1e-10
    planted = permute(m64, spec, perms)
    al = autoperm.match(m64, planted, spec, method="weight")
    back = permute(planted, spec, al.perms).state_dict()
    assert all(torch.allclose(back[k], v, atol=1e-10) for k, v in m64.state_dict().items())
    # negative control: a second grouped conv reads c2's within-group units with one weight slice
    # for all groups, so they stay shared, and per-group permutations there change the output
    twice = GroupedBlock(twice=True).eval()
    spec2 = autoperm.trace(twice, x, hierarchical=True)
    assert spec2.group("c2").parent is None
    forced = copy.deepcopy(spec2)
    forced.group("c2").axes = [a for a in forced.group("c2").axes if a.tensor != "c2b.weight"]
    forced.group("c2").parent = "c1"
    forced.validate()
    perms = autoperm.identity_permutation(forced)
    perms["c2"] = random_permutation(forced, seed=1, derangement=True)["c2"]
    perms["c2"][0] = torch.arange(4)  # group 0 unmoved, so c2b's unpermuted input slice fits it
    assert check_equivalence(perturbed(twice, seed=2), forced, perms, (x.double(),)) > 1e-3


class HeadsAsSequence(nn.Module):
    """One value in two roles of a product (review finding): ``sdpa(t, t, t)`` with the heads in
    the sequence dim, and ``linear(m, m)`` comparing every pair of heads' means."""

    def __init__(self, mode, dim=16, heads=4):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1) for p in (self.q, self.k, self.v))
        if self.mode == "sdpa_self":
            o = F.scaled_dot_product_attention(q, q, q)  # attends across heads
        else:
            qt = q.transpose(1, 2)
            gate = F.linear(qt.mean((0, 2)), qt.mean((0, 2))).sum(-1)  # <m_h, m_g> summed over g
            o = (F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2))
                 * gate.view(1, -1, 1, 1)).transpose(1, 2)
        return self.fc(self.o(o.reshape(b, n, d)).relu())


@pytest.mark.parametrize("mode, dim", [("sdpa_self", 16), ("sdpa_self", 8), ("linear_gram", 16)])
def test_one_value_in_two_roles_of_a_product_keeps_head_dim_shared(mode, dim):
    model = HeadsAsSequence(mode, dim=dim).eval()
    x = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(0))
    spec = autoperm.trace(model, x, hierarchical=True)
    assert spec.group("q#1").parent is None  # q's head_dim (heads: group "q") stays shared
    m64 = perturbed(model, seed=1)
    for seed in range(3):
        assert check_equivalence(m64, spec, random_permutation(spec, seed=seed), (x.double(),)) < 1e-10
    if mode == "sdpa_self":
        assert not _children(spec)
    else:
        assert spec.group("v").parent == "q"  # v never meets the cross-head product
    # negative control: rows that differ from head to head (row 0 kept) change the function
    forced = copy.deepcopy(spec)
    forced.group("q#1").parent = "q"
    perms = autoperm.identity_permutation(forced)
    perms["q#1"] = random_permutation(forced, seed=1, derangement=True)["q#1"]
    perms["q#1"][0] = torch.arange(perms["q#1"].shape[1])
    assert check_equivalence(m64, forced.validate(), perms, (x.double(),)) > 1e-3


class FlatTokens(nn.Module):
    """Attention whose output is flattened as (tokens, heads, head_dim) and layer-normed whole:
    there the head_dim chunks cycle through the heads (review finding for features="all")."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n * d)
        return self.fc(self.o(F.layer_norm(o, (n * d,)).view(b, n, d)).relu())


@pytest.mark.parametrize("features", ["pre", "all"])
def test_activation_refinement_uses_only_sites_chunked_by_head(features):
    a = perturbed(FlatTokens().eval(), seed=1)
    spec = autoperm.trace(a, _x().double(), hierarchical=True)
    assert set(_children(spec)) == {"q#1", "v"}
    data = [torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(i)).double() for i in range(3)]
    for seed in (8, 9):
        planted = random_permutation(spec, seed=seed, derangement=True)
        b = permute(a, spec, planted)
        al = autoperm.match(a, b, spec, method="activation", data=data, features=features)
        back = permute(b, spec, al.perms).state_dict()
        assert all(torch.allclose(back[k], v, atol=1e-10) for k, v in a.state_dict().items())
