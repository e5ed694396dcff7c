"""The test-model registry (tests/zoo.py) as a table: groups, frozen dims with reasons,
permutable share of parameter elements, hidden-channel share, trace time.

Usage: python benchmarks/zoo_table.py
Writes benchmarks/results/test_zoo.md and test_zoo.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import autoperm  # noqa: E402
from zoo import ZOO  # noqa: E402


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and no unknown flags
    rows = {}
    for name, (factory, inputs) in ZOO.items():
        torch.manual_seed(0)
        model, x = factory().eval(), inputs()
        t0 = time.perf_counter()
        spec = autoperm.trace(model, x, verify=False)
        t1 = time.perf_counter()
        report = autoperm.verify_spec(model, spec, x)
        cov = autoperm.coverage(spec, model)
        reasons = Counter(f.reason.split(" at ")[0] for f in spec.frozen)
        rows[name] = {"groups": len(spec.groups), "frozen": len(spec.frozen), "reasons": dict(reasons),
                      "param_share": cov.param_share, "hidden_share": cov.hidden_share,
                      "trace_s": t1 - t0, "verify_error": report.error}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "test_zoo.json").write_text(json.dumps(rows, indent=1))
    lines = ["# test zoo", "", "`python benchmarks/zoo_table.py`: every model of tests/zoo.py, traced without "
             "verification (trace s), then checked in float64 (verify error).", "",
             "| model | groups | frozen | permutable param share | hidden share | trace s | verify error | frozen reasons |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        why = "; ".join(f"{k} ({v})" for k, v in sorted(r["reasons"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {r['groups']} | {r['frozen']} | {r['param_share']:.3f} | {r['hidden_share']:.3f} | "
                     f"{r['trace_s']:.2f} | {r['verify_error']:.1e} | {why} |")
    (out / "test_zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
