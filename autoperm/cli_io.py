"""What the ``autoperm`` command line reads and writes: exit codes, `CLIError`, MODEL strings,
checkpoints (``torch.load(weights_only=True)`` or safetensors), ``--data`` files, and the
atomically written merged state_dict. Used by `autoperm.cli`.

Example::

    state = _load_state("a.pt", "A")          # CLIError(EXIT_FILE) if missing or unreadable
    _check_fits(state, model, "A", "a.pt")    # CLIError(EXIT_MISMATCH) naming the tensor
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CLIError", "EXIT_CODES"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_FILE, EXIT_MODEL = 0, 1, 2, 3, 4
EXIT_MISMATCH, EXIT_TRACE, EXIT_OUTPUT, EXIT_DEPENDENCY, EXIT_INTERRUPTED = 5, 6, 7, 8, 130
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected internal error (rerun with -v for the traceback and report it)",
    EXIT_USAGE: "bad command line: unknown option, malformed value, missing --data for a method that needs it",
    EXIT_FILE: "an input file (checkpoint, data, model file) is missing or cannot be read",
    EXIT_MODEL: "MODEL is not a valid model string, or the model could not be built",
    EXIT_MISMATCH: "a checkpoint does not fit the model (missing, unexpected or differently shaped tensor) or holds "
                   "non-finite values",
    EXIT_TRACE: "the model could not be traced or its spec failed the check (bad --input-shape, "
                "data-dependent control flow, unsound rule)",
    EXIT_OUTPUT: "the output cannot be written (it would overwrite an input, or the folder is not writable)",
    EXIT_DEPENDENCY: "an optional dependency is missing (torchvision, timm, matplotlib / graphviz, safetensors)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class CLIError(Exception):
    """A user-facing failure: one line of ``message`` and an exit ``code`` from `EXIT_CODES`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _load_model(name: str, input_shape: tuple[int, ...] | None):
    """(model, example inputs, description) for a MODEL string."""
    import torch

    from . import zoo

    kind, sep, rest = name.partition(":")
    is_file = ".py:" in name or name.endswith(".py")
    if not is_file and (not sep or kind not in ("torchvision", "timm") or not rest):
        raise CLIError(f"MODEL {name!r} is not a model string: write torchvision:NAME, timm:NAME or "
                       "path/to/file.py:factory", EXIT_MODEL)
    if is_file:
        path, _, factory = name.rpartition(":") if ".py:" in name else (name, "", "")
        if not factory:
            raise CLIError(f"MODEL {name!r} names no factory: write {name}:FACTORY (a function returning the model)",
                           EXIT_MODEL)
        if not Path(path).is_file():
            raise CLIError(f"model file {path!r} not found (MODEL {name!r})", EXIT_FILE)
    image = input_shape[-1] if input_shape and len(input_shape) == 4 and input_shape[-1] == input_shape[-2] else None
    try:
        model, inputs = zoo.load(name, image_size=image if not is_file else None)
    except ImportError as e:
        if not is_file:
            raise  # torchvision / timm missing: the zoo's message says what to install
        if isinstance(e, ModuleNotFoundError) and e.name:
            raise CLIError(f"model file {path!r} imports {e.name!r}, which is not installed: install it, or fix "
                           f"the import in {path!r}", EXIT_DEPENDENCY) from e
        raise CLIError(f"model file {path!r} failed to import: {_first_line(e)}", EXIT_DEPENDENCY) from e
    except Exception as e:  # unknown model names, factories that raise or lack
        raise CLIError(f"cannot build MODEL {name!r}: {type(e).__name__}: {e}", EXIT_MODEL) from e
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"MODEL {name!r} returned {type(model).__name__}, not a torch.nn.Module", EXIT_MODEL)
    if input_shape:  # in the model's floating dtype (a float64 factory gets float64 inputs)
        from ._data import float_dtype

        inputs = (torch.randn(*input_shape, dtype=float_dtype(model) or torch.float32),)
    elif is_file:
        from .example_inputs import infer_example_inputs

        try:
            inputs = infer_example_inputs(model)
        except ValueError as e:
            raise CLIError(f"{e}; pass --input-shape", EXIT_USAGE) from e
    return model, inputs


def _load_state(path: str, what: str) -> dict:
    import torch

    p = Path(path)
    _check_file(p, f"{what} checkpoint")
    try:
        if p.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CLIError(f"{path!r} is a .safetensors file: pip install safetensors", EXIT_DEPENDENCY) from None
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except CLIError:
        raise
    except Exception as e:
        if _pickled_objects(e):  # e.g. torch.save(model), or a training checkpoint with other objects
            raise CLIError(f"{what} checkpoint {path!r} holds pickled Python objects besides tensors (a whole "
                           "module saved with torch.save(model), or a training checkpoint with other entries?), "
                           "which autoperm does not unpickle: save model.state_dict() alone", EXIT_FILE) from e
        raise CLIError(f"cannot read {what} checkpoint {path!r}: it is not a state_dict saved by torch.save, nor a "
                       f".safetensors file ({_cause(e)})", EXIT_FILE) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{what} checkpoint {path!r} is not a state_dict (a dict of tensor names to tensors); "
                       "save one with torch.save(model.state_dict(), path)", EXIT_FILE)
    return state


def _check_fits(state: dict, model, what: str, path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise CLIError(f"{what} checkpoint {path!r} lacks tensor {missing[0]!r} of the model"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), EXIT_MISMATCH)
    if extra:
        raise CLIError(f"{what} checkpoint {path!r} has tensor {extra[0]!r}, which the model lacks"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), EXIT_MISMATCH)
    for k, t in expected.items():
        if state[k].is_floating_point() and not bool(state[k].isfinite().all()):
            raise CLIError(f"tensor {k!r} of {what} checkpoint {path!r} holds non-finite values (NaN / inf): "
                           "a diverged or corrupted checkpoint cannot be merged", EXIT_MISMATCH)
        if tuple(state[k].shape) != tuple(t.shape):
            raise CLIError(f"tensor {k!r} has shape {list(state[k].shape)} in {what} checkpoint {path!r} but "
                           f"{list(t.shape)} in the model; is --model the right architecture? (a model built for another input "
                           "size, e.g. a ViT's pos_embed, needs --input-shape N,C,H,W at the checkpoint's size)",
                           EXIT_MISMATCH)


def _load_data(path: str, batch_size: int) -> tuple[list, Any]:
    """Batches from a .pt file holding a tensor or an (inputs, targets) pair, and the targets."""
    import torch

    _check_file(Path(path), "data file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        hint = (": it holds pickled Python objects; save tensors only, e.g. torch.save((inputs, targets), path)"
                if _pickled_objects(e) else f": it is not a file saved by torch.save ({_cause(e)})")
        raise CLIError(f"cannot read data file {path!r}{hint}", EXIT_FILE) from e
    inputs = obj if isinstance(obj, torch.Tensor) else obj[0] if isinstance(obj, (tuple, list)) and obj else None
    if isinstance(inputs, torch.Tensor) and (inputs.dim() == 0 or len(inputs) == 0):
        raise CLIError(f"data file {path!r} holds no samples (inputs of shape {list(inputs.shape)})", EXIT_FILE)
    if isinstance(obj, torch.Tensor):
        return list(obj.split(batch_size)), None
    if (isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)
            and len(obj[0]) == len(obj[1])):
        x, y = obj
        return list(zip(x.split(batch_size), y.split(batch_size))), y
    raise CLIError(f"data file {path!r} must hold a tensor of inputs or an (inputs, targets) tuple of tensors "
                   f"of equal length; got {type(obj).__name__}", EXIT_FILE)


def _write_state(state: dict, out: Path) -> None:
    import torch

    from .viz_render import write_atomic

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save = torch.save
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CLIError("--out ends with .safetensors: pip install safetensors (or use .pt)", EXIT_DEPENDENCY) from None
        state = {k: v.clone() for k, v in state.items()}  # safetensors refuses shared storage
        save = save_file
    try:
        write_atomic(out, lambda tmp: save(state, tmp))
    except OSError as e:
        raise CLIError(f"cannot write --out {str(out)!r}: {e.strerror or type(e).__name__}", EXIT_OUTPUT) from e


def _first_line(e: Exception) -> str:
    """The first line of ``e``'s message, without terminal colour codes."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip().splitlines() or [""])[0])


def _cause(e: Exception) -> str:
    """``e``'s type and first line, without torch's advice to load with weights_only=False."""
    return type(e).__name__ + ("" if "Weights only load failed" in str(e) else f": {_first_line(e)}")


def _pickled_objects(e: Exception) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a class or function in the file (a real
    pickle of Python objects), rather than bytes that are no checkpoint at all."""
    return "Unsupported global" in str(e)


def _check_file(p: Path, what: str) -> None:
    if p.is_dir():
        raise CLIError(f"{what} {str(p)!r} is a folder: give the file inside it", EXIT_FILE)
    if not p.is_file():
        raise CLIError(f"{what} {str(p)!r} not found", EXIT_FILE)


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be written before any work is done: a folder, a path
    under a file, or a folder that is not writable (missing folders are created later)."""
    import os

    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder: give a file name, e.g. {str(out / 'merged.pt')!r}",
                       EXIT_OUTPUT)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"--out {str(out)!r} lies under {str(parent)!r}, which is a file, not a folder", EXIT_OUTPUT)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {str(out)!r}: folder {str(parent)!r} is not writable", EXIT_OUTPUT)


def _device(name: str):
    """``--device`` as a torch.device that this torch can use."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r} is not a device: write cpu, cuda, cuda:1 or mps",
                       EXIT_USAGE) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: this torch has no CUDA device available; use --device cpu", EXIT_USAGE)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA devices", EXIT_USAGE)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name!r}: MPS is not available; use --device cpu", EXIT_USAGE)
    return device
