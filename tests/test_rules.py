"""The rule registry: every entry documented, docs/rules.md current, unknown ops frozen with a
reason, users' rules registered (and a wrong one caught by the check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import autoperm
from autoperm.rules import RULES
from autoperm.rules.catalog import render_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


@torch.library.custom_op("autoperm_test::reverse_channels", mutates_args=())
def reverse_channels(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).clone()


@reverse_channels.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("autoperm_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@double.register_fake
def _(x):
    return torch.empty_like(x)


class CustomNet(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.op(torch.tanh(self.fc1(x))))


@pytest.fixture
def restore_rules():
    saved = dict(RULES)
    yield
    RULES.clear()
    RULES.update(saved)


def test_every_rule_is_documented_and_keyed_on_an_op():
    assert len(RULES) > 100
    for op, entry in RULES.items():
        assert entry.doc, f"rule {entry.fn.__name__} for {op} has no docstring"
        assert callable(op)


def test_docs_rules_md_is_generated_from_the_registry():
    assert DOCS.read_text().strip() == render_markdown().strip(), \
        "docs/rules.md is stale: python -m autoperm.rules.catalog > docs/rules.md"


def test_op_without_rule_freezes_with_reason():
    model = CustomNet(torch.ops.autoperm_test.double)
    spec = autoperm.trace(model, torch.randn(3, 4))
    assert spec.groups == []
    reasons = {f.reason for f in spec.frozen_of("fc1.weight") if f.dim == 0}
    assert len(reasons) == 1 and reasons.pop().startswith("no rule for autoperm_test.double.default at")
    assert spec.meta["unsupported_ops"] == {"autoperm_test.double.default": 1}


def test_strict_mode_raises_for_missing_rules():
    with pytest.raises(autoperm.UnsupportedOpError, match="autoperm_test.double.default"):
        autoperm.trace(CustomNet(torch.ops.autoperm_test.double), torch.randn(3, 4), strict=True)


def test_registered_user_rule_unfreezes(restore_rules):
    @autoperm.register_rule(torch.ops.autoperm_test.double.default)
    def double_rule(ctx):
        """Doubling is elementwise."""
        return ctx.tie_all(ctx.atoms(ctx.arg("x")), ctx.out)

    spec = autoperm.trace(CustomNet(torch.ops.autoperm_test.double), torch.randn(3, 4))
    (group,) = spec.groups
    assert {(a.tensor, a.dim) for a in group.axes} == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}


def test_wrong_user_rule_is_caught_by_the_check(restore_rules):
    @autoperm.register_rule(torch.ops.autoperm_test.reverse_channels)
    def wrong(ctx):
        """Wrong on purpose: reversing channels is not elementwise."""
        return ctx.tie_all(ctx.atoms(ctx.arg("x")), ctx.out)

    with pytest.raises(autoperm.UnsoundSpecError, match="group 'fc1'"):
        autoperm.trace(CustomNet(torch.ops.autoperm_test.reverse_channels), torch.randn(3, 4))


def test_register_rule_needs_an_op():
    with pytest.raises(TypeError, match="at least one op"):
        autoperm.register_rule()
