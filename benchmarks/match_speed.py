"""Weight matching speed and objective on ResNet-50 and ViT-B/16 sized pairs, against snimu's
`rebasin` (0.0.47, `PermutationCoordinateDescent`) on the same pair in the same process; where
autoperm's time goes; activation matching time per batch.

Usage: python benchmarks/match_speed.py [--models resnet50 vit_b_16] [--repeats 2] [--threads N]
Writes benchmarks/results/match_speed.md and match_speed.json (rows of models not run this time
are kept from the previous JSON).

Both matchers get the same pair: torchvision models, random init, model A from
``torch.manual_seed(0)`` and model B from ``torch.manual_seed(1)``. Both results are scored by
one function, `objective`: the sum over *every* floating-point state-dict entry of
``<A, B_aligned>`` in float64 (for autoperm, B permuted by its permutations; for rebasin, the
state dict of the model it returns), so both count the same tensors; entries neither touches
add the same constant to both. Runs alternate autoperm / rebasin per repeat, so both see the
same machine load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import autoperm  # noqa: E402
from autoperm.match import weight as weight_module  # noqa: E402
from autoperm.permute import permute_state_dict  # noqa: E402
from autoperm.zoo import load  # noqa: E402

STARTS = None  # weight matching starts (--starts; None: the library's default)
# other settings timed beside the main one (--no-variants skips them): name -> (starts, max_iter, tol)
VARIANTS = {"starts=2": (2, 100, 0.0), "tol=1e-3": (None, 100, 1e-3), "max_iter=1": (None, 1, 0.0)}

# activation matching inputs per model: (batch, image size)
ACT_INPUTS = {"resnet50": (16, 128), "vit_b_16": (4, 224)}


def objective(state_a, state_b) -> float:
    """Sum over every floating-point state-dict entry of ``<A, B>`` (float64)."""
    return float(sum(torch.dot(state_a[k].reshape(-1).double(), state_b[k].reshape(-1).double())
                     for k in state_a if state_a[k].is_floating_point()))


def pair(name):
    torch.manual_seed(0)
    a, x = load(f"torchvision:{name}")
    torch.manual_seed(1)
    b, _ = load(f"torchvision:{name}")
    return a, b, x


_MAIN = object()  # run_autoperm's starts: the main setting (STARTS, set by --starts at run time)


def run_autoperm(a, b, x, max_iter, starts=_MAIN, tol=0.0, spec=None):
    starts = STARTS if starts is _MAIN else starts
    t0 = time.perf_counter()
    spec = spec or autoperm.trace(a, x, verify=False)
    t_trace = time.perf_counter() - t0
    sa, sb = a.state_dict(), b.state_dict()
    stamps = []
    t1 = time.perf_counter()
    perms, history = weight_module.weight_matching(
        spec, sa, sb, max_iter=max_iter, starts=starts, tol=tol, progress=lambda it, obj: stamps.append((time.perf_counter() - t1, obj, it)))
    t_match = time.perf_counter() - t1
    prof = dict(weight_module.last_profile)
    obj = objective(sa, permute_state_dict(sb, spec, perms))
    return {"trace_s": t_trace, "match_s": t_match, "objective": obj, "passes": len(history),
            "groups": len(spec.groups), "profile": prof, "pass_times": stamps, "history": history}, spec


def run_rebasin(a, b, x, max_iter):
    from rebasin import PermutationCoordinateDescent

    b = copy.deepcopy(b)  # rebasin permutes model_b in place
    out = {}
    try:
        t0 = time.perf_counter()
        pcd = PermutationCoordinateDescent(a, b, x[0])
        out["init_s"] = time.perf_counter() - t0
        passes = []
        step = pcd._calculate_permutations_step  # wrapped only to count passes
        pcd._calculate_permutations_step = lambda loop: passes.append(1) or step(loop)
        torch.manual_seed(0)  # rebasin draws its group order from the global generator
        t1 = time.perf_counter()
        pcd.calculate_permutations(max_iter)
        out["match_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        pcd.apply_permutations()
        out["apply_s"] = time.perf_counter() - t2
        out["passes"] = len(passes)
        out["permutations"] = len(pcd.pinit.model_graph.permutation_to_info)
        out["objective"] = objective(a.state_dict(), pcd.model_b.state_dict())
    except Exception as e:  # recorded, not hidden
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc(limit=3)
    return out


def activation_time(a, b, spec, name):
    batch, size = ACT_INPUTS[name]
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(2)]
    seconds = {}
    for n in (1, 2):
        al = autoperm.match(a, b, spec, method="activation", data=data[:n])
        seconds[n] = al.seconds
    per_batch = seconds[2] - seconds[1]
    return {"batch": batch, "image": size, "one_batch_s": seconds[1], "two_batches_s": seconds[2],
            "per_batch_s": per_batch, "fixed_s": seconds[1] - per_batch}


def measure(name, repeats, max_iter, with_activation, variants=tuple(VARIANTS)):
    a, b, x = pair(name)
    row = {"identity_objective": objective(a.state_dict(), b.state_dict()), "autoperm": [], "rebasin": [],
           "params": sum(p.numel() for p in a.parameters()), "variants": {}}
    spec = None
    for r in range(repeats):
        print(f"{name}: repeat {r + 1}/{repeats}, autoperm", flush=True)
        got, spec = run_autoperm(a, b, x, max_iter)
        got["load"] = os.getloadavg()
        row["autoperm"].append(got)
        print(f"  {got['match_s']:.1f} s, objective {got['objective']:.6g}", flush=True)
        for label in variants:
            starts, iters, tol = VARIANTS[label]
            print(f"{name}: repeat {r + 1}/{repeats}, autoperm {label}", flush=True)
            got, _ = run_autoperm(a, b, x, iters, starts=starts, tol=tol, spec=spec)
            got["load"] = os.getloadavg()
            row["variants"].setdefault(label, []).append(got)
            print(f"  {got['match_s']:.1f} s, objective {got['objective']:.6g}", flush=True)
        print(f"{name}: repeat {r + 1}/{repeats}, rebasin", flush=True)
        got = run_rebasin(a, b, x, max_iter)
        got["load"] = os.getloadavg()
        row["rebasin"].append(got)
        print(f"  {got.get('match_s', float('nan')):.1f} s, objective {got.get('objective', float('nan')):.6g} "
              f"{got.get('error', '')}", flush=True)
        if "error" in got:
            break  # a failure repeats; no need to time it again
    if with_activation:
        print(f"{name}: activation matching", flush=True)
        row["activation"] = activation_time(a, b, spec, name)
    return row


def summary(row):
    ap, rb = row["autoperm"], [r for r in row["rebasin"] if "error" not in r]
    s = {"autoperm_match_s": statistics.median(r["match_s"] for r in ap),
         "autoperm_trace_s": statistics.median(r["trace_s"] for r in ap),
         "autoperm_objective": ap[0]["objective"], "autoperm_passes": ap[0]["passes"]}
    # the first start alone: its passes end where the per-pass objective first drops (the next
    # start begins from scratch) or where the pass counter restarts at 1
    stamps = ap[0]["pass_times"]
    ends = [i for i in range(1, len(stamps)) if stamps[i][1] < stamps[i - 1][1]
            or (len(stamps[i]) > 2 and stamps[i][2] == 1)]
    first = stamps[(ends[0] if ends else len(stamps)) - 1]
    offset = ap[0]["objective"] - ap[0]["history"][-1]
    s.update(autoperm_first_start_s=first[0], autoperm_first_start_objective=first[1] + offset,
             autoperm_passes_total=int(ap[0]["profile"].get("passes", 0)))
    for key in ("cost", "assignment", "objective", "setup"):
        s[f"autoperm_{key}_s"] = statistics.median(r["profile"].get(key, 0.0) for r in ap)
    if rb:
        s.update(rebasin_match_s=statistics.median(r["match_s"] for r in rb),
                 rebasin_init_s=statistics.median(r["init_s"] for r in rb),
                 rebasin_objective=rb[0]["objective"], rebasin_passes=rb[0]["passes"])
        s["ratio"] = s["rebasin_match_s"] / s["autoperm_match_s"]
        s["ratio_with_compile"] = ((s["rebasin_match_s"] + s["rebasin_init_s"])
                                   / (s["autoperm_match_s"] + s["autoperm_trace_s"]))
        # the per-pass objectives autoperm logs count only the tensors its spec permutes: the
        # others add a constant (offset), measured on the final result
        beat = [t for t, obj, *_ in ap[0]["pass_times"] if obj + offset >= s["rebasin_objective"]]
        s["autoperm_s_to_rebasin_objective"] = beat[0] if beat else None
    else:
        s["rebasin_error"] = row["rebasin"][0]["error"]
    return s


def write(rows, meta, out):
    out.mkdir(parents=True, exist_ok=True)
    for row in rows.values():
        row["summary"] = summary(row)
    (out / "match_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = ["# weight matching speed", "",
             f"`{meta['command']}`; torch {meta['torch']}, {meta['threads']} thread(s), {meta['cpu']}, "
             f"{meta['cpus']} cores shared with other jobs (load averages per run in the JSON, "
             f"{meta['load_start']} at the start). Pair: torchvision model, random init, A from seed 0, "
             "B from seed 1. Objective: sum over every floating-point state-dict entry of <A, aligned B> "
             "(float64), the same function for both results; `identity` is the unaligned pair. "
             "Times are medians over the repeats, autoperm and rebasin alternating in one process."
             + (f" Note: {meta['note']}." if meta.get("note") else ""), "",
             "| model | autoperm match s | rebasin match s | ratio | autoperm objective | rebasin objective | "
             "identity objective | groups (autoperm / rebasin) | passes (autoperm best start / rebasin) | compile s (autoperm trace / rebasin init) | "
             "ratio incl. compile |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        s = row["summary"]
        if "rebasin_error" in s:
            lines.append(f"| {name} | {s['autoperm_match_s']:.1f} | failed | - | {s['autoperm_objective']:.2f} | - | "
                         f"{row['identity_objective']:.2f} | {row['autoperm'][0]['groups']} / - | {s['autoperm_passes']} / - | "
                         f"{s['autoperm_trace_s']:.1f} / - | - |")
        else:
            lines.append(f"| {name} | {s['autoperm_match_s']:.1f} | {s['rebasin_match_s']:.1f} | {s['ratio']:.1f}x | "
                         f"{s['autoperm_objective']:.2f} | {s['rebasin_objective']:.2f} | "
                         f"{row['identity_objective']:.2f} | {row['autoperm'][0]['groups']} / "
                         f"{row['rebasin'][0]['permutations']} | {s['autoperm_passes']} / {s['rebasin_passes']} | "
                         f"{s['autoperm_trace_s']:.1f} / {s['rebasin_init_s']:.1f} | {s['ratio_with_compile']:.1f}x |")
    lines += ["", "Where autoperm's weight matching time goes (median s; `cost`: cost matrices built and updated, "
              "`assignment`: scipy linear assignments, `objective`: exact objective and per-assignment gains, "
              "`setup`: copying and permuting B per start; spec compilation is the trace column above):", "",
              "| model | cost | assignment | objective | setup | assignments solved / skipped | passes (all starts) | "
              "first start alone: s, objective | autoperm s to reach rebasin's final objective |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        s, prof = row["summary"], row["autoperm"][0]["profile"]
        reach = s.get("autoperm_s_to_rebasin_objective")
        lines.append(f"| {name} | {s['autoperm_cost_s']:.1f} | {s['autoperm_assignment_s']:.1f} | "
                     f"{s['autoperm_objective_s']:.1f} | {s['autoperm_setup_s']:.1f} | "
                     f"{int(prof.get('assignments', 0))} / {int(prof.get('skipped', 0))} | "
                     f"{s['autoperm_passes_total']} | {s['autoperm_first_start_s']:.1f}, "
                     f"{s['autoperm_first_start_objective']:.2f} | {'-' if reach is None else f'{reach:.1f}'} |")
    acts = {n: r["activation"] for n, r in rows.items() if "activation" in r}
    if acts:
        lines += ["", "Activation matching (`autoperm.match(method='activation')`, float64 statistics): time per "
                  "batch (two batches minus one) and the fixed part (assignments):", "",
                  "| model | batch | image | s per batch | fixed s |", "| --- | ---: | ---: | ---: | ---: |"]
        for n, r in acts.items():
            lines.append(f"| {n} | {r['batch']} | {r['image']}x{r['image']} | {r['per_batch_s']:.1f} | {r['fixed_s']:.1f} |")
    var = [(n, r) for n, r in rows.items() if r.get("variants") and "rebasin_match_s" in r["summary"]]
    if var:
        lines += ["", "Other settings of autoperm's weight matching, timed in the same run against the same "
                  "rebasin time (`starts=2`: also the greedy start; `tol`: stop once a pass gains less "
                  "than that share of the objective; `max_iter=1`: one pass; the default runs until a pass changes "
                  "nothing, with the number of starts the library picks for the model's size):", "",
                  "| model | setting | autoperm match s | ratio vs rebasin | objective | objective >= rebasin's |",
                  "| --- | --- | ---: | ---: | ---: | --- |"]
        for n, r in var:
            s = r["summary"]
            main = "default" if STARTS is None else f"starts={STARTS}"
            settings = [(f"{main} (starts={int(r['autoperm'][0]['profile'].get('starts', 0))})", r["autoperm"])]
            settings += list(r["variants"].items())
            for label, runs in settings:
                t = statistics.median(x["match_s"] for x in runs)
                obj = runs[0]["objective"]
                lines.append(f"| {n} | {label} | {t:.1f} | {s['rebasin_match_s'] / t:.1f}x | {obj:.2f} | "
                             f"{'yes' if obj >= s['rebasin_objective'] else 'no'} |")
    lines += ["", "Commands per row: " + "; ".join(f"{n}: `{r.get('command', meta['command'])}`"
                                                   for n, r in rows.items())]
    errors = {n: r["rebasin"][0] for n, r in rows.items() if "error" in r["rebasin"][0]}
    for n, e in errors.items():
        lines += ["", f"rebasin on {n} failed: `{e['error'][:300]}`"]
    (out / "match_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--starts", type=int, default=None, choices=(1, 2),
                    help="weight matching starts (default: the library's choice; 2: identity + greedy; 1: identity)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-activation", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated other settings to time beside the main one, from {list(VARIANTS)} "
                         "('' for none)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    global STARTS
    STARTS = args.starts
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = out / "match_speed.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else {}
    meta = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_start": os.getloadavg(),
            "repeats": args.repeats, "max_iter": args.max_iter,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    try:
        import rebasin  # noqa: F401
        from importlib.metadata import version

        meta["rebasin"] = version("rebasin")
    except ImportError:
        meta["rebasin"] = None
    for name in args.models:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        rows[name] = measure(name, args.repeats, args.max_iter, not args.no_activation, variants)
        rows[name]["command"] = meta["command"]
        write(rows, meta, out)


if __name__ == "__main__":
    main()
