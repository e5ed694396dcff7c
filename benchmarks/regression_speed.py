"""normalize="regression" time on zoo models: the one-pass refit (the merged graph and both
endpoints advance over every batch together, the merged one stopping at each layer) against
passes of its own per refit layer (what it falls back to past its memory limit), on the same
merged state; REPAIR's one pass on the same data beside it.

Usage: python benchmarks/regression_speed.py [--models torchvision:resnet18,...] [--batches 3] [--batch 16]
Needs torchvision and timm (random init, 64x64 inputs). Writes benchmarks/results/regression_speed.md
and .json. Per model: A and B as in repair_speed.py (seeds 0 and 1, BatchNorm statistics set by two
training-mode passes), aligned by weight matching, averaged at alpha = 0.5; the time is
regression_state's alone, and the two results are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import autoperm  # noqa: E402
from autoperm.merge.regression import find_fit_layers, regression_state  # noqa: E402
from repair_speed import merged_pair  # noqa: E402

MODELS = ("torchvision:resnet18,torchvision:mobilenet_v3_small,torchvision:densenet121,timm:vit_tiny_patch16_224,"
          "torchvision:resnet50")


def measure(name: str, n_batches: int, batch: int) -> dict:
    a, b, data, al, states, state, tg = merged_pair(name, n_batches, batch)
    layers = find_fit_layers(tg)
    args = (tg, state, layers, data, [(tg, s) for s in states], [0.5, 0.5])
    t0 = time.perf_counter()
    one = regression_state(*args)
    t1 = time.perf_counter()
    each = regression_state(*args, max_bytes=0)
    t2 = time.perf_counter()
    autoperm.merge(a, b, alignment=al, normalize="repair", data=data)
    t3 = time.perf_counter()
    diff = max(float((one[k] - each[k]).abs().max() / each[k].abs().max().clamp_min(1e-12))
               for k in one if one[k].is_floating_point())
    return {"nodes": len(tg.graph.nodes), "layers": len(layers), "through_bn": sum(lay.bn is not None for lay in layers),
            "skipped_dense": sum(1 for n in tg.graph.nodes if str(n.target).startswith("aten.conv")
                                 or str(n.target).startswith("aten.linear")) - len(layers),
            "one_pass_s": t1 - t0, "per_layer_s": t2 - t1, "repair_merge_s": t3 - t2, "max_rel_diff": diff}


def render(rows: dict, args) -> str:
    lines = ["# regression normalization: one pass over the data against passes per layer", "",
             f"`python benchmarks/regression_speed.py --models {args.models} --batches {args.batches} --batch "
             f"{args.batch}`; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}. "
             f"Random-init zoo models at 64x64, {args.batches} batches of {args.batch}; time of `regression_state` "
             "alone (one pass, then `max_bytes=0`: passes of its own per layer); `REPAIR merge s`: a whole "
             "`merge(..., normalize=\"repair\")` on the same data, for scale; `max rel diff`: the largest relative "
             "difference between the two refit state dicts; `not refit`: conv / linear nodes left as merged "
             "(tied, transposed, or a weight that is not a state tensor).", "",
             "| model | graph nodes | refit layers (through a BatchNorm) | not refit | per layer s | one pass s | "
             "speedup | REPAIR merge s | max rel diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['nodes']} | {r['layers']} ({r['through_bn']}) | {r['skipped_dense']} | "
                     f"{r['per_layer_s']:.2f} | {r['one_pass_s']:.2f} | {r['per_layer_s'] / r['one_pass_s']:.0f}x | "
                     f"{r['repair_merge_s']:.2f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.models.split(","):
        rows[name] = measure(name, args.batches, args.batch)
        print(name, rows[name], file=sys.stderr, flush=True)
        (out / "regression_speed.json").write_text(json.dumps(rows, indent=1))
        (out / "regression_speed.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()
