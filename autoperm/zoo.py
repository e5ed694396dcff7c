"""Model zoo loaders: ``load("torchvision:resnet18")``, ``load("timm:convnext_tiny")``,
``load("path/to/file.py:factory")``, each with example inputs.

torchvision and timm are optional. Where torchvision's compiled ops cannot load (a CUDA build of
torchvision beside a CPU torch), `import_torchvision` defines the two op schemas its Python code
registers fake kernels for (``torchvision::nms`` and ``torchvision::qnms``) before importing it;
the model classes then import and run. That is only done where a plain import fails in a
subprocess, because a second definition of the namespace raises on a working install.

Example::

    model, x = load("torchvision:resnet18", image_size=64)
    spec = autoperm.trace(model, x)
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["import_torchvision", "import_timm", "load", "example_inputs_for"]

log = logging.getLogger(__name__)
_KEEP: list[Any] = []  # keeps the fallback op library alive


def import_torchvision():
    """Import torchvision, working around a build whose compiled ops cannot load."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed: pip install --no-deps torchvision "
                          "(the version matching your torch)")
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0:
        log.info("plain 'import torchvision' fails (%s); defining its op schemas first",
                 (probe.stderr.strip().splitlines() or ["?"])[-1])
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
    import torchvision

    return torchvision


def import_timm():
    """Import timm (after torchvision, which it imports)."""
    import_torchvision()
    import timm

    return timm


def example_inputs_for(model: nn.Module, image_size: int | None = None, batch: int = 2) -> tuple[torch.Tensor]:
    """Image inputs for a classification model: ``image_size`` if given, else timm's
    ``pretrained_cfg["input_size"]``, else the first conv's channels at 224x224. A model whose
    first conv / linear / embedding is not a conv (an MLP, a text model) gets inputs for that
    layer instead (`autoperm.example_inputs.infer_example_inputs`; ``image_size`` is ignored)."""
    _check_image_size(image_size, "example_inputs_for")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, size = 3, 224
    if "input_size" in cfg:
        channels, size = cfg["input_size"][0], cfg["input_size"][-1]
    else:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                                     nn.Embedding))), None)
        if first is not None and not isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            from .example_inputs import infer_example_inputs

            return infer_example_inputs(model)
        if first is not None:
            channels = first.in_channels
    size = image_size if image_size is not None else size
    return (torch.randn(batch, channels, size, size),)


def _check_image_size(image_size: Any, where: str) -> None:
    if image_size is None:
        return
    error = TypeError if isinstance(image_size, bool) or not isinstance(image_size, int) else ValueError
    if error is TypeError or image_size < 1:
        raise error(f"{where}(image_size={image_size!r}): pass a positive whole number of pixels (e.g. 64), "
                    "or None for the model's usual input size")


def _from_file(spec: str) -> Callable[..., nn.Module]:
    path, _, name = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"model file {path!r} not found (expected path/to/file.py:factory)")
    source = Path(path).read_text(errors="replace")
    if ("torchvision" in source or "timm" in source) and "torchvision" not in sys.modules \
            and importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # the same workaround `torchvision:` and `timm:` names get
    mod_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(mod_spec)
    folder = str(Path(path).resolve().parent)
    sys.path.insert(0, folder)  # the file imports modules beside it, as `python file.py` lets it
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, name):
        raise AttributeError(f"{path} has no factory {name!r}")
    return getattr(module, name)


def load(name: str, *, image_size: int | None = None, **kwargs: Any) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A randomly initialized model and example inputs from ``"torchvision:NAME"``,
    ``"timm:NAME"`` or ``"path/to/file.py:factory"``. No weights are downloaded.

    With ``image_size`` (a positive int, else ``TypeError`` / ``ValueError``, as for a ``name``
    that is not a non-empty string),
    torchvision ViTs are built with ``image_size`` and timm models with ``img_size`` where their
    constructor accepts it.
    """
    if not isinstance(name, str) or not name.strip():
        raise (ValueError if isinstance(name, str) else TypeError)(f"load(name={name!r}): pass a non-empty model name such as 'torchvision:resnet18', "
                         "'timm:convnext_tiny' or 'path/to/file.py:factory'")
    _check_image_size(image_size, "load")
    kind, _, model_name = name.partition(":")
    if kind == "torchvision":
        tv = import_torchvision()
        if image_size is not None and model_name.startswith("vit_"):
            kwargs.setdefault("image_size", image_size)
        model = tv.models.get_model(model_name, weights=None, **kwargs)
    elif kind == "timm":
        timm = import_timm()
        model = None
        if image_size is not None:
            try:
                model = timm.create_model(model_name, pretrained=False, img_size=image_size, **kwargs)
            except TypeError:
                model = None
        if model is None:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
    elif name.endswith(".py") or ".py:" in name:
        model = _from_file(name)(**kwargs)
    else:
        raise ValueError(f"model name {name!r} must look like 'torchvision:resnet18', 'timm:convnext_tiny' "
                         "or 'path/to/file.py:factory'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name!r} returned {type(model).__name__}, not a torch.nn.Module: the factory must "
                        "return the model")
    model.eval()
    return model, example_inputs_for(model, image_size)
