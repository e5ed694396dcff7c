"""Models that cache a tensor computed from their weights in eval-mode forward (timm's LeViT and
EfficientFormer attention biases) and clear it in ``train()``.

Before the fix, the trace's input check filled the cache, export lifted it as a constant, and the
heads were frozen (sound but useless); a permuted or merged copy could also run on a cache of the
old weights. Now the trace sees the computation (the bias table joins the head group), and every
copy autoperm returns has its cache cleared.
"""

from __future__ import annotations

import torch
from torch import nn

import autoperm
from autoperm._copy import copy_module


class CachedBiasAttention(nn.Module):
    """LeViT-style attention: a learned bias per head and relative offset, gathered by an index
    buffer, cached per device in eval mode."""

    def __init__(self, dim=8, heads=2, tokens=4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, 2 * tokens - 1))
        pos = torch.arange(tokens)
        self.register_buffer("idx", (pos[:, None] - pos[None, :] + tokens - 1), persistent=False)
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.cache = {}
        return self

    def bias(self) -> torch.Tensor:
        if self.training:
            return self.attention_biases[:, self.idx]
        key = str(self.attention_biases.device)
        if key not in self.cache:
            self.cache[key] = self.attention_biases[:, self.idx]
        return self.cache[key]

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / self.hd ** 0.5 + self.bias()).softmax(-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))


def _model(seed=0):
    """float64, every parameter and buffer randomized (no default LayerNorm 1 / 0 to hide a bug)."""
    torch.manual_seed(seed)
    return autoperm.perturbed(nn.Sequential(nn.Linear(6, 8), CachedBiasAttention(), nn.LayerNorm(8),
                                            nn.Linear(8, 3)), seed)


def _x():
    return torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _head_group(spec):
    return [g for g in spec.groups if any(ax.tensor == "1.attention_biases" and ax.dim == 0 for ax in g.axes)]


def test_cached_bias_joins_the_head_group_even_after_the_caller_ran_the_model():
    model, x = _model(), _x()
    with torch.no_grad():
        model(x)  # the caller's model now holds a cache
    assert model[1].cache
    spec = autoperm.trace(model, (x,))  # verified on random permutations
    heads = _head_group(spec)
    assert len(heads) == 1 and heads[0].size == 2
    assert {ax.tensor for ax in heads[0].axes} >= {"1.qkv.weight", "1.proj.weight", "1.attention_biases"}
    assert not [f for f in spec.frozen if f.tensor == "1.attention_biases" and f.dim == 0]
    assert model[1].cache and not model.training  # the caller's model and its cache are untouched


def test_permuted_copy_does_not_run_on_the_old_cache():
    model, x = _model(), _x()
    spec = autoperm.trace(model, (x,))
    m64, x64 = copy_module(model), (x,)
    with torch.no_grad():
        ref = m64(*x64)  # fills m64's cache with its own biases
        perms = autoperm.random_permutation(spec, seed=3, derangement=True)
        out = autoperm.permute(m64, spec, perms)
        assert not out.training and not out[1].cache
        assert torch.allclose(out(*x64), ref, rtol=0, atol=1e-12)
        # negative control: the same permuted weights in a copy that keeps the stale cache
        stale = copy_module(m64)
        stale.load_state_dict(out.state_dict())
        assert stale[1].cache
        assert (stale(*x64) - ref).abs().max() > 1e-3


def test_merge_of_models_with_caches_uses_the_merged_bias():
    a, b, x = _model(0), _model(5), _x()
    with torch.no_grad():
        a(x), b(x)
    merged = autoperm.merge(a, b, example_inputs=(x,))
    fresh = _model()
    fresh.load_state_dict(merged.state_dict())
    fresh[1].cache = {}
    with torch.no_grad():
        assert torch.allclose(merged(x), fresh(x), rtol=0, atol=1e-12)
        # the merged bias differs from model_a's: a stale cache would show
        assert not torch.allclose(merged[1].attention_biases, a[1].attention_biases)
