"""REPAIR time on zoo models: the one-pass correction (every batch advances through the graph
together and stops at each layer) against one pass over the data per corrected layer (what it
replaced, and what it falls back to past its memory limit), on the same merged state.

Usage: python benchmarks/repair_speed.py [--models torchvision:resnet18,...] [--batches 3] [--batch 16]
Needs torchvision and timm (random init, 64x64 inputs). Writes benchmarks/results/repair_speed.md
and .json. Per model: A and B from seeds 0 and 1 (BatchNorm statistics set by two training-mode
passes, so they are not the defaults), aligned by weight matching, averaged at alpha = 0.5, then
REPAIR on ``--batches`` random batches; the time is repair_state's alone (the endpoints' goal
statistics are computed once, outside it), and the two results are compared tensor by tensor.
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

import autoperm  # noqa: E402
from autoperm.frontend import capture  # noqa: E402
from autoperm.merge.interpolate import average_states  # noqa: E402
from autoperm.merge.repair import channel_moments, find_layers, repair_state  # noqa: E402
from autoperm.zoo import load  # noqa: E402

MODELS = "torchvision:resnet18,torchvision:mobilenet_v3_small,torchvision:densenet121,timm:vit_tiny_patch16_224"


def endpoint(name: str, seed: int):
    torch.manual_seed(seed)
    model, x = load(name, image_size=64)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(16, *x[0].shape[1:]))
    return model.eval(), x


def merged_pair(name: str, n_batches: int, batch: int) -> tuple:
    """A and B (`endpoint`), random data batches, B aligned to A by weight matching, the averaged
    state and A's traced graph: ``(a, b, data, al, states, state, tg)``."""
    a, x = endpoint(name, 0)
    b, _ = endpoint(name, 1)
    data = [torch.randn(batch, *x[0].shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(n_batches)]
    al = autoperm.match(a, b, example_inputs=x, method="weight")
    b_al = autoperm.permute(b, al.spec, al.perms)
    states = [a.state_dict(), b_al.state_dict()]
    return a, b, data, al, states, average_states(states, [0.5, 0.5]), capture(a, x)


def measure(name: str, n_batches: int, batch: int) -> dict:
    a, b, data, al, states, state, tg = merged_pair(name, n_batches, batch)
    grouped = {ax.tensor for g in al.spec.groups for ax in g.axes if ax.dim == 0}
    layers = find_layers(tg, grouped)
    dense = [layer for layer in layers if layer.kind == "dense"]
    moments = [channel_moments(tg, s, data, dense) for s in states]
    goal = {n: ((moments[0][n][0] + moments[1][n][0]) / 2, (moments[0][n][1] + moments[1][n][1]) / 2)
            for n in moments[0]}
    row = {"layers": len(layers), "dense": len(dense), "batchnorm": len(layers) - len(dense),
           "nodes": len(tg.graph.nodes)}
    results = {}
    for tag, limit in (("one_pass", 2 << 30), ("per_layer", 0)):
        t0 = time.perf_counter()
        results[tag] = repair_state(tg, state, layers, data, goal, max_bytes=limit)
        row[f"{tag}_s"] = time.perf_counter() - t0
    one, per = results["one_pass"], results["per_layer"]
    row["max_rel_diff"] = max(float((one[k].double() - per[k].double()).abs().max()
                                    / per[k].double().abs().max().clamp_min(1e-30))
                              for k in per if per[k].is_floating_point() and per[k].numel())
    row["speedup"] = row["per_layer_s"] / row["one_pass_s"]
    return row


def render(rows: dict, args) -> str:
    lines = ["# REPAIR: one pass over the data against a pass per layer", "",
             f"`python benchmarks/repair_speed.py --models {args.models} --batches {args.batches} --batch {args.batch}`; "
             f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}. Random-init "
             f"zoo models at 64x64, {args.batches} batches of {args.batch}; time of `repair_state` alone; "
             "`max rel diff`: the largest relative difference between the two corrected state dicts.", "",
             "| model | graph nodes | corrected layers (dense / BatchNorm) | per layer s | one pass s | speedup | max rel diff |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['nodes']} | {r['layers']} ({r['dense']} / {r['batchnorm']}) | "
                     f"{r['per_layer_s']:.2f} | {r['one_pass_s']:.2f} | {r['speedup']:.0f}x | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.models.split(","):
        rows[name] = measure(name, args.batches, args.batch)
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        (out / "repair_speed.json").write_text(json.dumps(rows, indent=1))
        (out / "repair_speed.md").write_text(render(rows, args))
    print(render(rows, args))


if __name__ == "__main__":
    main()
