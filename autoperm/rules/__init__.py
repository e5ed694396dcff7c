"""Permutation rules, one per op family, in one registry (`RULES`).

Importing this package registers every built-in family: dense (linear, matmul, conv, embedding,
PReLU), norm, pointwise, shape, reduce (reductions, pooling, resampling) and attention.
"""

from . import attention, dense, norm, pointwise, reduce, shape  # noqa: F401  (registers rules)
from .base import RULES, Rule, RuleContext, RuleEntry, op_name, register_rule, rule_for

__all__ = ["RULES", "Rule", "RuleContext", "RuleEntry", "register_rule", "rule_for", "op_name"]
