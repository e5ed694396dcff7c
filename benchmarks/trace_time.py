"""Compile time of autoperm.trace on reference-sized models: export, analysis, verification.

Usage: python benchmarks/trace_time.py [--repeats 3]
Writes benchmarks/results/trace_time.md and trace_time.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import autoperm  # noqa: E402
from autoperm.analysis import analyze  # noqa: E402
from autoperm.frontend import capture  # noqa: E402
from autoperm.verify import verify_spec  # noqa: E402
from models import ResNet50, ViTB16  # noqa: E402

CASES = {
    "resnet50 (25.6M, 2x3x224x224)": (ResNet50, (2, 3, 224, 224)),
    "resnet50 (25.6M, 2x3x64x64)": (ResNet50, (2, 3, 64, 64)),
    "vit_b_16 (86M, 2x3x224x224)": (ViTB16, (2, 3, 224, 224)),
}


def measure(factory, shape, repeats):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    cap, ana = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tg = capture(model, x)
        t1 = time.perf_counter()
        spec = analyze(tg)
        t2 = time.perf_counter()
        cap.append(t1 - t0)
        ana.append(t2 - t1)
    t3 = time.perf_counter()
    report = verify_spec(model, spec, (x,))
    ver = time.perf_counter() - t3
    cov = autoperm.coverage(spec, model)
    return {"capture_s": statistics.median(cap), "analysis_s": statistics.median(ana),
            "trace_s": statistics.median(c + a for c, a in zip(cap, ana)), "verify_s": ver,
            "verify_error": report.error, "groups": len(spec.groups), "frozen": len(spec.frozen),
            "param_share": cov.param_share, "hidden_share": cov.hidden_share,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    rows = {name: measure(f, s, args.repeats) for name, (f, s) in CASES.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "repeats": args.repeats}
    (out / "trace_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# trace time", "", f"`python benchmarks/trace_time.py --repeats {args.repeats}`; torch "
             f"{meta['torch']}, {meta['threads']} threads, median of {args.repeats}. trace = export "
             "(capture) + analysis, without verification; verify = the float64 check of trace(verify=True).",
             "", "| model | trace s | export s | analysis s | verify s | groups | frozen | param share | "
             "hidden share | verify error |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['trace_s']:.2f} | {r['capture_s']:.2f} | {r['analysis_s']:.3f} | "
                     f"{r['verify_s']:.2f} | {r['groups']} | {r['frozen']} | {r['param_share']:.3f} | "
                     f"{r['hidden_share']:.3f} | {r['verify_error']:.1e} |")
    (out / "trace_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
