"""Head and head_dim groups of every attention layer in the zoo's attention models.

Issue target: every ViT / DeiT / BEiT-like model has head and head_dim groups, not only the
residual stream. For each model, every outermost submodule with an integer ``num_heads`` (or ``n_heads``)
attribute is an attention layer; for the tensors under it (qkv / q / k / v / in_proj / proj weights) we list the
groups acting on dim 0 and check that
- a *head* group exists: size ``num_heads``, laid out with ``inner`` = head_dim slots per unit, and
- a *head_dim* group exists: laid out with ``inner`` = 1 and ``outer`` a multiple of num_heads
  (one slot per unit in every head, and in each of q / k / v for a fused projection), or with one
  ``inner`` = 1 axis per head on one tensor (a ``(heads, q | k | v)`` layout such as LeViT's).
Models with ``num_heads == 1`` everywhere need no head group (only head_dim is checked).

Usage: python benchmarks/attention_groups.py [--models timm:vit_base_patch16_224 ...]
Writes benchmarks/results/attention_groups.md and .json. Input sizes are the ones the zoo
coverage benchmark used (benchmarks/results/zoo_coverage.json), 64x64 where the model accepts it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import autoperm
from autoperm.zoo import load

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT = [
    "torchvision:vit_b_16", "torchvision:vit_b_32", "torchvision:swin_t", "torchvision:maxvit_t",
    "timm:vit_base_patch16_224", "timm:deit3_base_patch16_224", "timm:deit_tiny_patch16_224",
    "timm:beit_base_patch16_224", "timm:beit3_base_patch16_224", "timm:eva02_base_patch14_224",
    "timm:cait_s24_224", "timm:convit_base", "timm:crossvit_9_240", "timm:pit_b_224",
    "timm:tnt_b_patch16_224", "timm:xcit_medium_24_p8_224", "timm:samvit_base_patch16",
    "timm:naflexvit_base_patch16_gap", "timm:vit_base_mci_224", "timm:test_vit_relpos",
    "timm:swin_base_patch4_window7_224", "timm:levit_128",
]


NOTES = [
    "## Notes", "",
    "- **EVA-02** (`eva02_*`): the head group and the head_dim group of v and the output projection are "
    "there; q / k have **no head_dim group, by necessity**. RoPE rotates slot pairs of q and k by angles "
    "read from `rope.pos_embed`, a non-persistent buffer (no state_dict key, so it cannot be permuted) "
    "whose pairs all have different frequencies; a permutation of pairs would change the angles, and a "
    "swap inside a pair reverses the rotation. With a state_dict table the analysis gives a q / k group "
    "of head_dim / 2 pairs (tests/test_rope_relpos.py). The v group used to be missing because "
    "`q.type_as(v)` was read as elementwise in v, tying v's head_dim to the frozen RoPE table; casts now "
    "tie only their input.",
    "- **SAM-ViT** (`samvit_*`): the head group used to be frozen by `rel_h[:, :, :, :, None]`, a full "
    "slice over the `B * heads` dim that the slice rule treated as unknown because the batch is "
    "symbolic; a slice of a whole dim is now a tie. The rel-pos tables are shared by all heads, their "
    "columns join the q / k head_dim group.",
    "- **test_vit_relpos**: its `RelPosMlp` bias networks have `num_heads` too; nested modules count as "
    "part of the enclosing attention layer (their output rows carry the head group).",
    "- Two runs ago (every module with `num_heads` counted, nested ones included): 18 of 22 models "
    "passed (eva02_base 0 / 12, samvit_base 0 / 12, test_vit_relpos 9 / 18, levit_128 0 / 14). Counting "
    "outermost layers halves the layer counts of torchvision's ViTs (24 -> 12) and maxvit_t (44 -> 22).",
    "- **LeViT** (`levit_128`): head_dim groups are one axis per head (its qkv is laid out "
    "`(heads, q | k | v)`). Its heads used to be frozen: in eval mode the attention bias is read from "
    "`attention_bias_cache`, filled by the trace's own input check and then lifted by export as a "
    "constant. The trace now calls `eval()` again after that check (timm clears the cache in `train()`), "
    "so export traces `attention_biases[:, idxs]` and the bias table joins the head group; every copy "
    "autoperm returns goes through `train(mode)`, so none runs on a stale cache "
    "(tests/test_forward_cache.py). The run before this one: 21 of 22 models (levit_128 0 / 14).",
]


def _sizes_from_coverage() -> dict[str, int | None]:
    path = RESULTS / "zoo_coverage.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {k: r.get("image_size_arg") for k, r in rows.items()}


def attention_layers(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Outermost submodules with an integer ``num_heads`` / ``n_heads``: a module with one inside
    another (torchvision's MultiheadAttention in an EncoderBlock, timm's RelPosMlp bias network in
    an Attention) is part of that layer, and its tensors are checked with it."""
    out: list[tuple[str, int]] = []
    for name, m in model.named_modules():
        heads = next((getattr(m, a) for a in ("num_heads", "n_heads") if isinstance(getattr(m, a, None), int)), None)
        if heads is not None and name and not any(name.startswith(p + ".") for p, _ in out):
            out.append((name, heads))
    return out


def check_layer(spec: autoperm.PermutationSpec, prefix: str, heads: int) -> dict:
    """Groups on dim 0 of the tensors under ``prefix``: is there a head group and a head_dim group?"""
    found_heads, found_hd, tensors = [], [], set()
    for g in spec.groups:
        for ax in g.axes:
            if not ax.tensor.startswith(prefix + ".") or ax.dim != 0 or len(spec.shapes[ax.tensor]) < 2:
                continue
            tensors.add(ax.tensor)
            if heads > 1 and g.size == heads and ax.inner > 1:
                found_heads.append(g.name)
            if ax.inner == 1 and ax.outer >= heads and ax.outer % heads == 0 and ax.outer > 1 and g.size > 1:
                found_hd.append(g.name)
        # a (heads, q | k | v) layout such as LeViT's: one axis per head, the same group in each
        per_head = {}
        for ax in g.axes:
            if ax.tensor.startswith(prefix + ".") and ax.dim == 0 and ax.inner == 1 and ax.outer == 1:
                per_head.setdefault(ax.tensor, set()).add(ax.offset)
        if heads > 1 and g.size > 1 and any(len(offs) >= heads for offs in per_head.values()):
            found_hd.append(g.name)
    hd = sorted(set(found_hd))
    per_head = [g for g in hd if spec.group(g).parent in set(found_heads)]
    return {"layer": prefix, "num_heads": heads, "head_groups": sorted(set(found_heads)),
            "head_dim_groups": hd, "per_head_groups": per_head, "tensors": sorted(tensors),
            "ok": (bool(found_heads) or heads == 1) and bool(found_hd)}


def run(name: str, size: int | None) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, x = load(name, image_size=size)
    spec = autoperm.trace(model, x, verify=True, hierarchical=True)  # verified with per-head permutations
    layers = [check_layer(spec, p, h) for p, h in attention_layers(model)]
    return {"model": name, "input": list(x[0].shape), "trace_verify_s": round(time.perf_counter() - t0, 2),
            "groups": len(spec.groups), "attention_layers": len(layers),
            "layers_ok": sum(r["ok"] for r in layers), "layers": layers,
            "head_dim_groups": sum(len(r["head_dim_groups"]) for r in layers),
            "per_head_groups": sum(len(r["per_head_groups"]) for r in layers)}


def render(rows: list[dict]) -> str:
    """The markdown report for ``rows`` (what `run` returns, one per model)."""
    lines = ["# head and head_dim groups in attention models", "",
             f"`python benchmarks/attention_groups.py` (torch {torch.__version__}, autoperm "
             f"{autoperm.__version__}). An attention layer is an outermost submodule with an integer "
             "`num_heads` (one nested in another is part of it); it passes when some group of size "
             "num_heads acts on dim 0 of a tensor under it with head_dim slots per unit (the head group) "
             "and some group acts there repeated in every head (a head_dim group). Every spec below was "
             "verified (float64, random permutations). Specs are traced with `hierarchical=True`: the last "
             "column counts the head_dim groups that take one permutation per head (their parent is the "
             "layer's head group, `autoperm.hierarchy`), and the check drew a different permutation per head.", "",
             "| model | input | groups | attention layers | with head + head_dim groups | example layer: head groups / head_dim groups | head_dim groups per head |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | ERROR | {r['error']} | |")
            continue
        ex = next((layer for layer in r["layers"] if layer["ok"]), r["layers"][0] if r["layers"] else None)
        desc = (f"`{ex['layer']}` (H={ex['num_heads']}): {', '.join(ex['head_groups']) or '-'} / "
                f"{', '.join(ex['head_dim_groups']) or '-'}") if ex else "-"
        per_head = f"{r['per_head_groups']} / {r['head_dim_groups']}" if "per_head_groups" in r else "-"
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['groups']} | "
                     f"{r['attention_layers']} | {r['layers_ok']} | {desc} | {per_head} |")
    ok = sum(1 for r in rows if "error" not in r and r["layers_ok"] == r["attention_layers"])
    lines += ["", f"{ok} of {len(rows)} models have head + head_dim groups in every attention layer.",
              f"{sum(r.get('per_head_groups', 0) for r in rows)} of "
              f"{sum(r.get('head_dim_groups', 0) for r in rows)} head_dim groups take one permutation per head.", ""]
    return "\n".join(lines + NOTES) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=DEFAULT)
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the markdown from results/attention_groups.json without tracing")
    args = ap.parse_args()
    if args.render_only:
        rows = json.loads((RESULTS / "attention_groups.json").read_text())
        (RESULTS / "attention_groups.md").write_text(render(rows))
        return
    torch.set_num_threads(1)
    sizes = _sizes_from_coverage()
    rows = []
    for name in args.models:
        try:
            row = run(name, sizes.get(name, 64))
        except Exception as exc:  # noqa: BLE001 - report, never hide
            row = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k != "layers"}, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_groups.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "attention_groups.md").write_text(render(rows))


if __name__ == "__main__":
    main()
