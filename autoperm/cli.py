"""The ``autoperm`` command line: ``spec``, ``merge`` and ``demo`` (see docs/cli.md).

Every failure the user can fix ends with one line on stderr, ``autoperm: error: ...``, and a
distinct exit code (`EXIT_CODES`); ``-v`` adds the traceback and INFO logging. The merged
checkpoint is written atomically and never over one of its inputs.

Example::

    from autoperm.cli import main
    main(["spec", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--out", "spec.png"])
    main(["merge", "a.pt", "b.pt", "--model", "net.py:make", "--out", "merged.pt"])
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from . import __version__

__all__ = ["main", "build_parser", "CLIError", "EXIT_CODES", "EXIT_FILE", "EXIT_MISMATCH", "EXIT_MODEL", "EXIT_OUTPUT",
           "EXIT_USAGE"]

log = logging.getLogger(__name__)

from .cli_io import (EXIT_CODES, EXIT_DEPENDENCY, EXIT_FILE, EXIT_INTERNAL, EXIT_INTERRUPTED,  # noqa: F401
                     EXIT_MISMATCH, EXIT_MODEL, EXIT_OK, EXIT_OUTPUT, EXIT_TRACE, EXIT_USAGE, CLIError,
                     _check_fits, _check_out, _device, _load_data, _load_model, _load_state, _write_state)


# ----------------------------------------------------------------- parsing
def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write positive sizes separated by commas, "
                                         "e.g. 1,3,224,224")
    return shape


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _choices(kind: str) -> list[str]:
    if kind == "method":
        from .match import METHODS

        return sorted(METHODS)
    from . import merging

    return [n for n in getattr(merging, "NORMALIZATIONS", ("reset", "repair", "rescale")) if n]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``autoperm --help``, ``autoperm merge --help``)."""
    codes = "\n".join(f"  {c:<4} {why}" for c, why in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="autoperm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile the permutation symmetries of PyTorch models; align and merge models with them.",
        epilog=f"MODEL is torchvision:NAME, timm:NAME or path/to/file.py:factory.\n\nexit codes:\n{codes}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    parser.add_argument("--version", action="version", version=f"autoperm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{spec,merge,demo}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress and show tracebacks")

    spec = sub.add_parser("spec", parents=[common], help="compile a model's permutation spec, summarize it, "
                          "write it as JSON / DOT / SVG / PNG",
                          description="Trace MODEL, print a summary (groups, frozen dims, coverage, time), "
                          "optionally the per-tensor table, and write --out by its extension.")
    spec.add_argument("model", metavar="MODEL", help="torchvision:resnet18, timm:convnext_tiny or file.py:factory")
    spec.add_argument("--input-shape", type=_shape, metavar="SHAPE",
                      help="example input shape, e.g. 1,3,64,64 (default: the model's usual input)")
    spec.add_argument("--out", metavar="FILE", help="write the spec: .json (reload with PermutationSpec.load), "
                      ".dot, .svg or .png (a graph of layers, or of groups with --compact)")
    spec.add_argument("--table", action="store_true", help="print the per-tensor table (group on each dim)")
    spec.add_argument("--compact", action="store_true", help="draw one node per group instead of one per layer")
    spec.add_argument("--no-verify", action="store_true", help="skip the float64 check of the spec (faster)")
    spec.add_argument("--per-head", action="store_true",
                      help="hierarchical groups: one head_dim permutation per attention head where provable")

    merge = sub.add_parser("merge", parents=[common], help="align checkpoint B to A and merge them",
                           description="Load two state_dict checkpoints of MODEL, align B to A, interpolate "
                           "(alpha is the weight of B), optionally normalize, write the merged state_dict.")
    merge.add_argument("a", metavar="A", help="state_dict of model A (.pt / .pth, or .safetensors)")
    merge.add_argument("b", metavar="B", help="state_dict of model B")
    merge.add_argument("--model", required=True, metavar="MODEL", help="the architecture of A and B")
    merge.add_argument("--method", default="weight", choices=_choices("method"),
                       help="alignment (default: weight; identity = naive averaging)")
    merge.add_argument("--alpha", type=_finite_float, default=0.5, help="weight of B in the average (default: 0.5)")
    merge.add_argument("--normalize", choices=_choices("normalize"),
                       help="after averaging: reset BatchNorm statistics, repair / rescale activations, refit every "
                            "layer to the endpoints' interpolated outputs (regression; these four need --data), or "
                            "calibrate / remove biases (no data)")
    merge.add_argument("--data", metavar="FILE", help="a .pt file holding a tensor of inputs or an "
                       "(inputs, targets) tuple; needed by --method activation and by --normalize")
    merge.add_argument("--batch-size", type=_positive_int, default=256, help="batch size for --data (default: 256)")
    merge.add_argument("--input-shape", type=_shape, metavar="SHAPE", help="example input shape for tracing")
    merge.add_argument("--seed", type=int, default=0, help="seed of the matcher (default: 0)")
    merge.add_argument("--per-head", action="store_true", help="align each attention head's head_dim on its own "
                       "(weight / activation matching on a hierarchical spec)")
    merge.add_argument("--device", default="cpu", help="torch device to merge on, e.g. cuda (default: cpu)")
    merge.add_argument("--out", default="merged.pt", metavar="FILE",
                       help="merged state_dict (default: merged.pt; .safetensors with safetensors installed)")

    demo = sub.add_parser("demo", parents=[common], help="train two small residual CNNs on digits, compile the "
                          "spec, merge them (naive, weight / activation matching, REPAIR) and write the spec "
                          "graph and curve")
    demo.add_argument("--out", default="autoperm_demo", help="output folder (default: autoperm_demo)")
    demo.add_argument("--epochs", type=int, default=8, help="training epochs per model (default: 8)")
    return parser


# ----------------------------------------------------------------- commands
def cmd_spec(args: argparse.Namespace) -> int:
    """``autoperm spec``: trace, summarize, write."""
    from .api import trace
    from .metrics import coverage

    if args.out:  # a wrong --out is refused before the model is built and traced
        out = Path(args.out)
        if out.suffix.lower() not in (".json", ".dot", ".gv", ".svg", ".png"):
            raise CLIError(f"--out {args.out!r}: use a .json, .dot, .svg or .png file name", EXIT_USAGE)
        _check_out(out)
    t0 = time.perf_counter()
    model, inputs = _load_model(args.model, args.input_shape)
    log.info("built %s in %.1fs; tracing on inputs %s", args.model, time.perf_counter() - t0,
             [tuple(t.shape) for t in inputs])
    t1 = time.perf_counter()
    spec = trace(model, inputs, verify=not args.no_verify, hierarchical=args.per_head)
    seconds = time.perf_counter() - t1
    print(_summary(args.model, inputs, spec, coverage(spec, model), seconds))
    if args.table:
        print()
        print(spec.table())
    if args.out:
        from .viz import render_spec

        out = Path(args.out)
        try:
            render_spec(spec, out, model=model, example_inputs=inputs, compact=args.compact)
        except OSError as e:
            raise CLIError(f"cannot write --out {args.out!r}: {e}", EXIT_OUTPUT) from e
        print(f"wrote {out}")
    return EXIT_OK


def _summary(name: str, inputs, spec, cov, seconds: float) -> str:
    sizes = sorted(g.size for g in spec.groups)
    top = sorted(spec.frozen_reasons(locations=False).items(), key=lambda kv: -kv[1])[:3]
    meta = spec.meta
    check = (f", check {meta['verify_s']:.1f}s: max relative error {meta['verify_error']:.1e}"
             if "verify_s" in meta else ", not checked (--no-verify)")
    shapes = " ".join("x".join(map(str, t.shape)) for t in inputs)
    return (f"{name} ({meta.get('model', '?')}, input {shapes}): {len(spec.groups)} permutation group{'' if len(spec.groups) == 1 else 's'}"
            + (f" (sizes {sizes[0]}..{sizes[-1]}, {sum(sizes)} units)" if sizes else "")
            + f", {len(spec.frozen)} frozen dims"
            + (" (top reasons: " + "; ".join(f"{r} x{n}" for r, n in top) + ")" if top else "")
            + f". Coverage: {_percent(cov.hidden_share)} of {cov.hidden_atoms} hidden channels grouped, "
            f"{_percent(cov.param_share)} of {cov.param_elements:,} parameters moved by some group. "
            f"Traced in {seconds:.1f}s (export {meta.get('capture_s', 0):.1f}s, "
            f"analysis {meta.get('analysis_s', 0):.2f}s{check})." + _per_slot(spec))


def _percent(share: float) -> str:
    return "n/a" if share != share else f"{100 * share:.1f}%"  # nan: nothing counted (0 / 0)


def _per_slot(spec) -> str:
    """With ``--per-head``: the per-slot groups (one permutation per slot of their parent)."""
    if not spec.meta.get("hierarchical"):
        return ""
    kids = [g for g in spec.groups if g.parent]
    if not kids:
        return ("\nPer slot (--per-head): no group takes one permutation per slot of another here "
                "(no attention heads or grouped convolutions proven); the groups above act alike on every slot.")
    sizes = {g.name: g.size for g in spec.groups}
    lines = [f"\nPer slot (--per-head): {len(kids)} group{' takes' if len(kids) == 1 else 's take'} one permutation "
             "per slot of their parent:"]
    lines += [f"  {g.name} (size {g.size}): one per slot of {g.parent} ({sizes[g.parent]} slots)" for g in kids[:12]]
    if len(kids) > 12:
        lines.append(f"  ... {len(kids) - 12} more (--table lists them all)")
    return "\n".join(lines)


def cmd_merge(args: argparse.Namespace) -> int:
    """``autoperm merge``: load, align, interpolate, normalize, write."""
    import torch

    from .merging import merge

    out = Path(args.out)
    for what, p in (("A", args.a), ("B", args.b)):
        if Path(p).exists() and (out.resolve() == Path(p).resolve() or (out.exists() and out.samefile(p))):
            raise CLIError(f"--out {args.out!r} is checkpoint {what}; refusing to overwrite an input: "
                           "choose another --out", EXIT_OUTPUT)
    _check_out(out)
    device = _device(args.device)
    from .match import NEEDS_DATA
    from .merging import DATA_FREE

    needs = ([f"--method {args.method}"] if args.method in NEEDS_DATA else []) + (
        [f"--normalize {args.normalize}"] if args.normalize not in DATA_FREE else [])
    if needs and not args.data:
        raise CLIError(f"{' and '.join(needs)} measures activations and needs --data FILE "
                       "(a .pt file holding a tensor of inputs or an (inputs, targets) tuple)", EXIT_USAGE)
    t0 = time.perf_counter()
    state_a, state_b = _load_state(args.a, "A"), _load_state(args.b, "B")
    data, targets = _load_data(args.data, args.batch_size) if args.data else (None, None)
    if args.method == "ste" and targets is None:
        raise CLIError(f"--method ste minimizes the merged model's loss and needs targets: --data {args.data!r} "
                       "must hold an (inputs, targets) tuple, e.g. torch.save((x, y), 'data.pt')", EXIT_USAGE)
    model, inputs = _load_model(args.model, args.input_shape)
    _check_fits(state_a, model, "A", args.a)
    _check_fits(state_b, model, "B", args.b)
    model_a = model.to(device)
    model_a.load_state_dict(state_a)
    model_b = copy.deepcopy(model_a)
    model_b.load_state_dict(state_b)
    if data is not None:
        data = _to_model(data, model_a, device)
    if not args.input_shape and data is not None:
        inputs = None  # merge takes them from the first batch of data
    kwargs: dict[str, Any] = dict(alpha=args.alpha, method=args.method, data=data, normalize=args.normalize,
                                  seed=args.seed,
                                  example_inputs=tuple(t.to(device) for t in inputs) if inputs else None)
    if args.method in ("sinkhorn", "ste") and "loss_fn" in inspect.signature(merge).parameters and targets is not None:
        kwargs["loss_fn"] = torch.nn.functional.cross_entropy if not targets.is_floating_point() else \
            torch.nn.functional.mse_loss
    if args.per_head:
        from .api import trace

        first = kwargs["example_inputs"] or (data[0][0] if isinstance(data[0], tuple) else data[0],)
        kwargs["spec"] = trace(model_a, first, hierarchical=True)
    log.info("aligning B to A (%s) and merging", args.method)
    merged = merge(model_a, model_b, **kwargs)
    _write_state(merged.state_dict(), out)
    n = sum(p.numel() for p in merged.parameters())
    print(f"merged {args.a} and {args.b} ({args.model}; method {args.method}, alpha {args.alpha}, normalize "
          f"{args.normalize or 'none'}): wrote {out} ({n:,} parameters) in {time.perf_counter() - t0:.1f}s")
    if targets is not None and not targets.is_floating_point():
        accs = [_accuracy(m, data) for m in (model_a, model_b, merged)]
        print("accuracy on --data: A {:.1f}%, B {:.1f}%, merged {:.1f}%".format(*(100 * a for a in accs)))
    return EXIT_OK


def _to_model(data: list, model, device) -> list:
    """``--data`` batches on ``device``, their floating-point inputs cast to the model's floating
    dtype (a float64 file for a float32 model; targets are left alone), with a warning."""
    from ._data import float_dtype
    from ._progress import progress

    dtype = float_dtype(model)
    first = data[0][0] if data and isinstance(data[0], tuple) else data[0] if data else None
    if dtype is not None and first is not None and first.is_floating_point() and first.dtype != dtype:
        log.warning("--data holds %s inputs and the model is %s: casting the inputs to %s", str(first.dtype)[6:],
                    str(dtype)[6:], str(dtype)[6:])

    def inputs(t):
        return t.to(device=device, dtype=dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    return [(inputs(b[0]), *(t.to(device) for t in b[1:])) if isinstance(b, tuple) else inputs(b)
            for b in progress(data, desc="moving data", total=len(data))]


def _accuracy(model, data) -> float:
    import torch

    model = model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in data:
            out = model(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                return float("nan")
            right += (out.argmax(1) == y).sum().item()
            total += len(y)
    return right / max(total, 1)


def cmd_demo(args: argparse.Namespace) -> int:
    """``autoperm demo``: the built-in merge demo on digits."""
    from .demo import run_demo

    print(run_demo(args.out, args.epochs))
    return EXIT_OK


# ----------------------------------------------------------------- entry point
def _shape_values(argv: list[str]) -> list[str]:
    """``--input-shape -1,3,8,8`` as ``--input-shape=-1,3,8,8``, so that argparse hands the value to
    the shape check (which names it) instead of taking it for an option."""
    import re

    out: list[str] = []
    it = iter(argv)
    for a in it:
        nxt = next(it, None) if a == "--input-shape" else None
        if nxt is not None and re.fullmatch(r"-[0-9,x-]+", nxt):
            out.append(f"--input-shape={nxt}")
        else:
            out += [a] + ([nxt] if nxt is not None else [])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(_shape_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as e:  # --help (0) or a usage error (2): argparse has printed the message
        return int(e.code or 0)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    from ._progress import progress_enabled

    shown = logging.getLogger("autoperm.progress")
    level = shown.level
    if not verbose and progress_enabled():  # a terminal: progress lines even without -v (bars with tqdm)
        shown.setLevel(logging.INFO)
    commands = {"spec": cmd_spec, "merge": cmd_merge, "demo": cmd_demo}
    try:
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), 8))
        return commands[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, verbose)
    except CLIError as e:
        return _fail(str(e), e.code, verbose)
    except Exception as e:
        return _fail(*_classify(e), verbose)
    finally:
        shown.setLevel(level)  # main() may run again in this process (tests, notebooks)


def _classify(e: Exception) -> tuple[str, int]:
    from .errors import ExampleInputError, ShapeMismatchError, TraceError, UnsoundSpecError

    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, ShapeMismatchError):
        return first, EXIT_MISMATCH
    if isinstance(e, (TraceError, ExampleInputError, UnsoundSpecError)):
        return (f"{type(e).__name__}: {first} (check the example input: --input-shape, and the shape and dtype of "
                "the inputs in --data)"), EXIT_TRACE
    if isinstance(e, ImportError):
        return first, EXIT_DEPENDENCY
    if isinstance(e, FileNotFoundError):
        return first, EXIT_FILE
    if isinstance(e, ValueError):
        return first, EXIT_USAGE
    return f"internal error: {type(e).__name__}: {first} (rerun with -v for the traceback)", EXIT_INTERNAL


def _fail(message: str, code: int, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    print(f"autoperm: error: {message}", file=sys.stderr)
    return code
