"""Cases found by adversarial review: each was unsound or crashed before its fix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import autoperm
from helpers import float64_inputs


def assert_sound(model, x):
    spec = autoperm.trace(model, x, verify=False)
    m64 = autoperm.perturbed(model, 0)
    for seed in range(3):
        perms = autoperm.random_permutation(spec, seed, derangement=True)
        err = autoperm.check_equivalence(m64, spec, perms, float64_inputs((x,)))
        assert err < 1e-9, f"unsound: {err:.2e}"
    return spec


class AnyEmptyDims(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + self.c(self.op(h > 0, dim=()).to(h.dtype))


@pytest.mark.parametrize("op", [torch.any, torch.all])
def test_any_all_with_empty_dims_is_elementwise(op):
    spec = assert_sound(AnyEmptyDims(op), torch.randn(3, 8))
    assert not any(len(g.axes) == 1 and g.axes[0].tensor == "c.weight" for g in spec.groups)


class AddBmm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(2, 5))
        self.w = nn.Parameter(torch.randn(3, 4, 5))

    def forward(self, x):
        return torch.addbmm(self.bias, x.view(3, 2, 4), self.w)


def test_addbmm_bias_is_constrained():
    assert_sound(AddBmm(), torch.randn(6, 4))


class BatchReshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        z = self.a(x).view(x.shape[0], 2, 3).transpose(0, 1).reshape(-1)
        return z.view(2, -1).sum(-1)


def test_symbolic_strides_differing_by_a_constant():
    assert_sound(BatchReshapes(), torch.randn(3, 6))


def test_legacy_weight_norm_is_copied_and_permuted():
    """The legacy weight_norm hook stores a non-leaf weight on the module, recomputed from
    weight_g / weight_v by a pre-hook on every call: copying must work, and the ``_weight_norm``
    rule gives the hidden group (it froze everything before the rule existed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 3))
        spec = autoperm.trace(model, torch.randn(2, 8))
        assert spec.meta["unsupported_ops"] == {}
        assert [g.size for g in spec.groups] == [6]
        assert {a.tensor for a in spec.groups[0].axes} >= {"0.weight_g", "0.weight_v", "2.weight"}
        m64 = autoperm.perturbed(model, 1)
        perms = autoperm.random_permutation(spec, 1, derangement=True)
        assert autoperm.check_equivalence(m64, spec, perms, torch.randn(5, 8, dtype=torch.float64)) < 1e-9


class CachesInForward(nn.Module):
    """Like timm's EfficientFormer: eval mode caches a tensor computed from a parameter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.cache = {}

    def forward(self, x):
        if not self.training:
            self.cache["s"] = self.scale * 2  # a non-leaf tensor stored on the module
        return self.fc2(torch.relu(self.fc1(x)) * self.scale * 2)


def test_model_that_cached_a_non_leaf_tensor_can_be_traced_and_merged():
    model = CachesInForward().eval()
    x = torch.randn(3, 4)
    model(x)
    spec = autoperm.trace(model, x)
    assert len(spec.groups) == 1
    merged = autoperm.merge(model, CachesInForward().eval(), example_inputs=x)
    assert merged(x).shape == (3, 2)


class SelectiveKernel(nn.Module):
    """Two conv branches stacked on a new dim and mixed by a softmax over it (timm's SKNet)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 5, padding=2)
        self.attn = nn.Conv2d(6, 12, 1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        branches = torch.stack([self.a(x), self.b(x)], dim=1)  # N, 2, C, H, W
        w = self.attn(branches.sum(1).mean((2, 3), keepdim=True)).view(x.shape[0], 2, 6, 1, 1)
        return self.head((branches * w.softmax(1)).sum(1))


def test_stack_ties_the_stacked_tensors_and_freezes_the_new_dim():
    """aten.stack had no rule, which froze every SKNet channel (hidden share 0.29 on skresnet18)."""
    model = SelectiveKernel()
    spec = assert_sound(model, torch.randn(2, 3, 8, 8))
    groups = {frozenset(ax.tensor for ax in g.axes) for g in spec.groups}
    assert any({"a.weight", "b.weight", "head.weight"} <= members for members in groups)
    # negative control: permuting branch a's channels alone changes the output
    g = next(g for g in spec.groups if any(ax.tensor == "a.weight" and ax.dim == 0 for ax in g.axes))
    lone = autoperm.PermutationSpec([autoperm.PermGroup(g.name, g.size, [ax for ax in g.axes if ax.tensor.startswith("a.")])],
                                    [], dict(spec.shapes), dict(spec.tied))
    perms = autoperm.random_permutation(lone, 0, derangement=True)
    assert autoperm.check_equivalence(autoperm.perturbed(model, 0), lone, perms, (torch.randn(2, 3, 8, 8).double(),)) > 1e-3


class ZeroKeyBias(nn.Module):
    """BEiT / EVA attention: qkv bias = cat(q_bias, k_bias, v_bias), k_bias a non-persistent zero buffer."""

    def __init__(self, dim=8, heads=2, k_bias=None):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim) if k_bias is None else k_bias, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def test_constant_non_persistent_buffer_does_not_freeze_attention_heads():
    """BEiT's zero k_bias froze every head and head_dim group (13 groups on beit_base)."""
    x = torch.randn(2, 5, 8)
    spec = assert_sound(ZeroKeyBias(), x)
    on_qkv = [g for g in spec.groups if any(ax.tensor == "qkv.weight" and ax.dim == 0 for ax in g.axes)]
    assert {g.size for g in on_qkv} == {2, 4}, [(g.name, g.size) for g in on_qkv]  # heads and head_dim
    # a non-persistent buffer that varies along its dim still freezes it
    varying = ZeroKeyBias(k_bias=torch.arange(8.0))
    spec2 = assert_sound(varying, x)
    on_k = [g.name for g in spec2.groups for ax in g.axes
            if ax.tensor == "qkv.weight" and ax.dim == 0 and ax.offset <= 8 < ax.offset + g.size * ax.outer * ax.inner]
    assert not on_k, f"the k slice (rows 8..15) must stay frozen: {on_k}"
    assert any("k_bias" in f.reason for f in spec2.frozen)


class CachedBias(nn.Module):
    """timm LeViT: an eval-mode cache (a plain dict) of a zero-initialized parameter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.bias = nn.Parameter(torch.zeros(6))
        self.cache = {}

    def forward(self, x):
        if "b" not in self.cache:
            self.cache["b"] = self.bias * 1.0
        return self.fc2(torch.relu(self.fc1(x) + self.cache["b"]))


def test_lifted_constant_that_caches_a_parameter_stays_frozen():
    """A lifted tensor (not a buffer) that happens to be constant is not a structural constant."""
    spec = assert_sound(CachedBias(), torch.randn(3, 4))
    assert not any(ax.tensor == "fc1.weight" and ax.dim == 0 for g in spec.groups for ax in g.axes)


class WarmupBuffer(nn.Module):
    """A non-persistent buffer that is all zeros at capture but written by the forward later on."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.g = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(4, 8)
        self.register_buffer("buf", torch.zeros(8), persistent=False)
        self.register_buffer("step", torch.zeros(()), persistent=False)

    def forward(self, x):
        h = torch.relu(self.fc1(x)) + self.buf
        self.step.add_(1)
        self.buf.copy_(torch.where(self.step > 2, self.g(x).mean(0), 0.0))
        return self.fc2(h)


def test_buffer_written_in_forward_is_not_treated_as_constant():
    """A buffer constant only at capture time let fc1's units be permuted; from the 4th call on the
    permuted model added the (unpermuted) buffer to permuted units."""
    model, x = WarmupBuffer().eval(), torch.randn(3, 4)
    spec = autoperm.trace(model, x)
    assert not any(ax.tensor == "fc1.weight" for g in spec.groups for ax in g.axes)
    m64 = autoperm.perturbed(model, 0)
    perms = autoperm.random_permutation(spec, 0, derangement=True)
    a, b = copy.deepcopy(m64), autoperm.permute(copy.deepcopy(m64), spec, perms)
    for _ in range(5):
        assert torch.allclose(a(x.double()), b(x.double()))


class RunningMean(nn.Module):
    """Adds a running mean of its hidden units, updated in every call, to those units."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        h = torch.relu(self.fc1(x)) + self.ema
        self.ema.copy_(0.5 * self.ema + 0.5 * h.mean(0).detach())
        return self.fc2(h)


def test_buffer_written_in_forward_verifies_from_one_state():
    """verify_spec ran the reference first and permuted the model afterwards, so the permuted
    copy carried the updated running mean: trace raised UnsoundSpecError on this model, and a
    sound hand-written spec failed verification."""
    model, x = RunningMean(), torch.randn(5, 4)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    axes = [autoperm.Axis("fc1.weight", 0), autoperm.Axis("fc1.bias", 0), autoperm.Axis("fc2.weight", 1)]
    sound = autoperm.PermutationSpec([autoperm.PermGroup("h", 8, axes + [autoperm.Axis("ema", 0)])], shapes=shapes)
    assert autoperm.verify_spec(model, sound, (x,)).error < 1e-10
    # negative control: the running mean left out of the group changes the output
    broken = autoperm.PermutationSpec([autoperm.PermGroup("h", 8, axes)], shapes=shapes)
    with pytest.raises(autoperm.UnsoundSpecError):
        autoperm.verify_spec(model, broken, (x,))


def test_buffer_written_in_forward_moves_with_the_buffer():
    """The new value of a buffer is a graph output; it used to be frozen as a model output (and
    with it every unit it touches). It is tied to the buffer instead: the next call reads it as
    the buffer, so it only has to move as the buffer moves. Checked over several calls."""
    model, x = RunningMean(), torch.randn(5, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = autoperm.trace(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's buffer
    group = next(g for g in spec.groups if any(ax.tensor == "ema" for ax in g.axes))
    assert {(ax.tensor, ax.dim) for ax in group.axes} == {("fc1.weight", 0), ("fc1.bias", 0), ("ema", 0),
                                                          ("fc2.weight", 1)}
    m64 = autoperm.perturbed(model, 0)
    perms = autoperm.random_permutation(spec, 0, derangement=True)
    a, b = copy.deepcopy(m64), autoperm.permute(copy.deepcopy(m64), spec, perms)
    for _ in range(4):
        assert torch.allclose(a(x.double()), b(x.double()))
    assert torch.allclose(b.ema, a.ema[perms[group.name]])
    # negative control: the permuted model with the unpermuted running mean computes something else
    wrong = copy.deepcopy(b)
    wrong.ema.copy_(a.ema)
    assert not torch.allclose(a(x.double()), wrong(x.double()))


class _Stats(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("m", torch.ones(6))


class DataAssign(_Stats):
    """Writes its buffer through ``.data``, which torch.export does not record."""

    def forward(self, x):
        h = torch.relu(self.l1(x)) * self.m
        self.m.data = self.l1(x).mean(0).detach().flip(0)
        return self.l2(h)


class LazyInit(_Stats):
    """Fills its buffer on the first call only, behind a Python flag (export sees the later path)."""

    def __init__(self):
        super().__init__()
        self.ready = False

    def forward(self, x):
        if not self.ready:
            self.m.copy_(x.mean(0).repeat(2)[:6])
            self.ready = True
        return self.l2(torch.relu(self.l1(x)) * self.m)


class WriteOnly(_Stats):
    """Records the mean hidden activation, never reads it."""

    def forward(self, x):
        h = torch.relu(self.l1(x))
        self.m.copy_(h.mean(0))
        return self.l2(h)


class InputWrite(_Stats):
    """Scales its input in place after using it."""

    def forward(self, x):
        h = torch.relu(self.l1(x)) * self.m
        x.mul_(2)
        return self.l2(h)


def _calls_agree(model, spec, n=4):
    m64 = autoperm.perturbed(model, 3)
    perms = autoperm.random_permutation(spec, 1, derangement=True)
    a, b = copy.deepcopy(m64), autoperm.permute(copy.deepcopy(m64), spec, perms)
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        if not torch.allclose(a(x.clone()), b(x.clone()), rtol=1e-9, atol=1e-12):
            return False
    return True


@pytest.mark.parametrize("cls", [DataAssign, LazyInit])
def test_buffer_written_outside_the_graph_is_frozen(cls):
    """The graph shows no write, so the buffer looked like fixed state and joined l1's units: the
    permuted model then stored an unpermuted value (relative error 0.5 - 1.5 from the 2nd call)."""
    model, x = cls().eval(), torch.randn(5, 4)
    spec = autoperm.trace(model, x)
    assert not any(ax.tensor in ("m", "l1.weight") for g in spec.groups for ax in g.axes)
    assert any(f.tensor == "m" and "outside the traced graph" in f.reason for f in spec.frozen)
    # negative control: the spec the analysis gave before (m moving with l1's units) fails after a call
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    old = autoperm.PermutationSpec([autoperm.PermGroup("l1", 6, [autoperm.Axis("l1.weight", 0), autoperm.Axis(
        "l1.bias", 0), autoperm.Axis("m", 0), autoperm.Axis("l2.weight", 1)])], shapes=shapes)
    assert not _calls_agree(cls().eval(), old)


def test_write_only_buffer_moves_with_its_units():
    """A buffer the forward only writes was 'unused', and the tie froze the whole hidden layer."""
    model = WriteOnly().eval()
    spec = autoperm.trace(model, torch.randn(5, 4))
    group = next(g for g in spec.groups if any(ax.tensor == "m" for ax in g.axes))
    assert {ax.tensor for ax in group.axes} >= {"l1.weight", "l2.weight", "m"}
    assert _calls_agree(model, spec)


def test_forward_writing_its_input():
    """A forward scaling its input in place: trace changed the caller's example tensor, and its check
    fed the scaled tensor to the permuted copy, raising UnsoundSpecError on a sound spec."""
    model, x = InputWrite().eval(), torch.randn(5, 4)
    x0 = x.clone()
    spec = autoperm.trace(model, x)
    assert torch.equal(x, x0)
    assert any(ax.tensor == "l1.weight" for g in spec.groups for ax in g.axes)
    assert _calls_agree(model, spec)


def test_lazy_module_gets_a_clear_error():
    """An uninitialized LazyLinear used to fail deep inside (shape of an uninitialized parameter)."""
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(autoperm.TraceError, match=r"lazy parameters \(0.weight, 0.bias\).*call the model once"):
        autoperm.trace(model, torch.randn(5, 4))
    model(torch.randn(5, 4))  # materialized: traces
    assert autoperm.trace(model, torch.randn(5, 4)).groups


def test_reset_keeps_model_a_integer_buffers():
    """normalize='reset' recounted num_batches_tracked (the batches of data=), though integer
    buffers come from model_a; the running statistics are still recomputed."""
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
            for _ in range(2))
    for m, n in ((a, 7), (b, 3)):                      # non-default statistics and counters
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].num_batches_tracked.fill_(n)
    data = [torch.randn(8, 2, 4, 4) for _ in range(3)]
    plain = autoperm.merge(a, b, example_inputs=data[0])
    merged = autoperm.merge(a, b, normalize="reset", data=data)
    assert int(merged[1].num_batches_tracked) == 7 == int(a[1].num_batches_tracked)
    assert not torch.allclose(merged[1].running_var, plain[1].running_var)


def test_interpolated_batchnorm_and_extrapolation_are_warned(caplog, monkeypatch):
    """Merging BatchNorm models without normalize='reset' (usually a broken model) and an alpha
    outside [0, 1] were only logged at INFO or not at all; the BatchNorm warning comes once per
    process (a curve merges many times) and not at an endpoint."""
    import logging

    import autoperm.merging as merging

    monkeypatch.setattr(merging, "_WARNED", set())
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
            for _ in range(2))
    x = torch.randn(4, 2, 4, 4)
    with caplog.at_level(logging.INFO, logger="autoperm"):
        autoperm.merge(a, b, alpha=0.0, example_inputs=x)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        autoperm.merge(a, b, example_inputs=x)
        autoperm.merge(a, b, alpha=0.3, example_inputs=x)
        bn = [r for r in caplog.records if "BatchNorm statistics were interpolated" in r.getMessage()]
        assert [r.levelno for r in bn] == [logging.WARNING, logging.INFO]
        autoperm.merge(a, b, alpha=1.5, example_inputs=x)
        assert any(r.levelno == logging.WARNING and "alpha=1.5 lies outside [0, 1]" in r.getMessage()
                   for r in caplog.records)


def test_repair_and_rescale_do_not_warn_of_interpolated_batchnorm_nor_measure_the_endpoints_for_nothing(
        caplog, monkeypatch):
    """REPAIR / RESCALE set every BatchNorm's statistics exactly, yet the 'interpolated' warning
    fired (and used up its once-per-process WARNING); and with every merged layer feeding a
    BatchNorm the endpoints were still run over the data for no statistic at all."""
    import logging

    import autoperm.merging as merging

    monkeypatch.setattr(merging, "_WARNED", set())
    calls = []
    real = merging.channel_moments
    monkeypatch.setattr(merging, "channel_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
            for _ in range(2))
    data = [torch.randn(8, 2, 4, 4) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="autoperm"):
        for mode in ("repair", "rescale"):
            merged = autoperm.merge(a, b, normalize=mode, data=data, example_inputs=data[0])
            with torch.no_grad():
                h = merged[0](torch.cat(data))
            assert torch.allclose(merged[1].running_mean, h.mean((0, 2, 3)), atol=1e-6)
        assert not [r for r in caplog.records if "interpolated" in r.getMessage()]
        assert calls == []   # the conv feeds a BatchNorm: no endpoint statistics needed
        autoperm.merge(a, b, example_inputs=data[0])   # this one does interpolate them: the WARNING is still there to give
        assert [r.levelno for r in caplog.records if "interpolated" in r.getMessage()] == [logging.WARNING]


def test_a_model_file_that_uses_torchvision_gets_the_zoo_import_workaround(tmp_path, monkeypatch):
    """`--model file.py:make` whose file imports torchvision failed where torchvision's compiled
    ops cannot load, although `--model torchvision:NAME` works (autoperm.zoo.import_torchvision)."""
    import importlib.util
    import sys

    import autoperm.zoo as zoo

    seen = []
    monkeypatch.setattr(zoo, "import_torchvision", lambda: seen.append(1))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "torchvision"
                        else real_find(name, *a))
    uses = tmp_path / "uses.py"
    uses.write_text("import torch\n# built like torchvision.models.resnet18\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    plain = tmp_path / "plain.py"
    plain.write_text("import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    assert isinstance(zoo._from_file(f"{plain}:make")(), nn.Linear) and seen == []
    assert isinstance(zoo._from_file(f"{uses}:make")(), nn.Linear) and seen == [1]
