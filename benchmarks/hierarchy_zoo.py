"""Hierarchical groups across the zoo: how many groups take one permutation per parent slot.

For every model the zoo coverage benchmark traced (benchmarks/results/zoo_coverage.json; the same
input sizes; models it skipped for size are skipped here), `autoperm.trace(model, x,
hierarchical=True)` compiles the spec and verifies it in float64 with a different random
permutation per parent slot (every head, every conv group). The table lists the per-slot
(child) groups, their parents, and any error: an `UnsoundSpecError` here would be a bug of the
analysis (`autoperm.hierarchy`).

Usage: python benchmarks/hierarchy_zoo.py [--models torchvision:resnext50_32x4d ...] [--match REGEX] [--limit N]
Writes benchmarks/results/hierarchy_zoo.md and .json. ``--match`` keeps the zoo models whose name
matches (the run in results/ used `--match "$(cat benchmarks/hierarchy_zoo_match.txt)"`: attention,
grouped-conv and related families, where parents can arise).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import autoperm
from autoperm.zoo import load

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _zoo_rows() -> dict[str, dict]:
    rows = json.loads((RESULTS / "zoo_coverage.json").read_text())["rows"]
    return {k: r for k, r in rows.items() if r.get("status") not in ("skipped", "skip")}


def run(name: str, size) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, x = load(name, image_size=size)
    spec = autoperm.trace(model, x, hierarchical=True)
    kids = [g for g in spec.groups if g.parent]
    return {"model": name, "groups": len(spec.groups), "children": len(kids),
            "parents": len({g.parent for g in kids}), "child_units": sum(g.size for g in kids),
            "example": f"{kids[0].name} (per slot of {kids[0].parent})" if kids else "",
            "verify_error": spec.meta.get("verify_error"), "seconds": round(time.perf_counter() - t0, 2)}


def render(rows: list[dict], command: str = "python benchmarks/hierarchy_zoo.py") -> str:
    ok = [r for r in rows if "error" not in r]
    lines = ["# hierarchical groups across the zoo", "",
             f"`{command}` (torch {torch.__version__}, autoperm {autoperm.__version__}; "
             "inputs as in zoo_coverage.json). Each spec is traced with `hierarchical=True` and verified in "
             "float64 with a different random permutation per parent slot.", "",
             f"{len(ok)} of {len(rows)} models traced and verified; {sum(r['children'] > 0 for r in ok)} have "
             f"per-slot groups ({sum(r['children'] for r in ok)} in all); errors: {len(rows) - len(ok)}.", "",
             "| model | groups | per-slot groups | parents | example | verify error | s |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | ERROR: {r['error']} | | |")
        else:
            err = "" if r["verify_error"] is None else f"{r['verify_error']:.1e}"
            lines.append(f"| {r['model']} | {r['groups']} | {r['children']} | {r['parents']} | {r['example']} | "
                         f"{err} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every model of zoo_coverage.json")
    ap.add_argument("--match", default=None, help="keep the zoo models whose name matches this regex")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args()
    listed = (HERE / "hierarchy_zoo_match.txt").read_text().strip()
    command = "python benchmarks/hierarchy_zoo.py" + (
        "" if args.match is None else ' --match "$(cat benchmarks/hierarchy_zoo_match.txt)"'
        if args.match.strip() == listed else f" --match '{args.match}'")
    if args.render_only:
        rows = json.loads((RESULTS / "hierarchy_zoo.json").read_text())
        (RESULTS / "hierarchy_zoo.md").write_text(render(rows, command))
        return
    torch.set_num_threads(1)
    zoo = _zoo_rows()
    names = args.models or [n for n in zoo if args.match is None or re.search(args.match, n)]
    rows = []
    for name in names[:args.limit]:
        try:
            row = run(name, zoo.get(name, {}).get("image_size_arg", 64))
        except Exception as exc:  # noqa: BLE001 - report, never hide
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(name, row, flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "hierarchy_zoo.json").write_text(json.dumps(rows, indent=1))
        (RESULTS / "hierarchy_zoo.md").write_text(render(rows, command))


if __name__ == "__main__":
    main()
