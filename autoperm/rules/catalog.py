"""``docs/rules.md``, generated from the registry (the registry is the single source of truth).

Regenerate with ``python -m autoperm.rules.catalog > docs/rules.md``; a test checks it is current.
"""

from __future__ import annotations

from collections import defaultdict

from .base import RULES, op_name

__all__ = ["render_markdown"]


def _key_name(op) -> str:
    name = getattr(op, "__name__", None) or op_name(op)
    packet = getattr(op, "_qualified_op_name", None)
    return packet.replace("::", ".") if packet else f"operator.{name}" if op.__module__ == "_operator" else name


def render_markdown() -> str:
    """Every registered op grouped by rule, with the rule's one-line equivariance argument."""
    by_rule: dict[tuple[str, str], list[str]] = defaultdict(list)
    docs: dict[tuple[str, str], str] = {}
    for op, entry in RULES.items():
        key = (entry.family, entry.fn.__name__)
        by_rule[key].append(_key_name(op))
        docs[key] = entry.doc
    lines = ["# Permutation rules", "",
             "Generated from `autoperm.rules.RULES` by `python -m autoperm.rules.catalog`; do not edit.",
             "", "An op that is not listed here has no rule: every dim it touches is frozen, with the reason",
             "`no rule for <op> at <module> (<file>:<line>)`. Add one with `autoperm.register_rule`",
             "(see writing_a_rule.md).", "",
             f"{len(RULES)} ops, {len(by_rule)} rules.", ""]
    families = sorted({fam for fam, _ in by_rule})
    for fam in families:
        lines += [f"## {fam}", "", "| rule | what it proves | ops |", "| --- | --- | --- |"]
        for key in sorted(k for k in by_rule if k[0] == fam):
            ops = ", ".join(f"`{o}`" for o in sorted(by_rule[key]))
            lines.append(f"| `{key[1]}` | {docs[key]} | {ops} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown())
