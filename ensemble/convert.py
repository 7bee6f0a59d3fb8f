"""Chest-X-ray DenseNet121 weights from PyTorch onto the Keras DenseNet121 backbone (`cxr convert-weights`).

The public chest-X-ray DenseNet121 (torchxrayvision's ``densenet121-res224-all``: torchvision's
DenseNet121 layout, one input channel, 18 outputs) is a PyTorch state dict. Its ``features.*``
tensors map one to one onto keras.applications.DenseNet121 without top (same 7×7/2 stem, blocks of
6/12/24/16 layers, transitions, final BatchNorm); the 18-way classifier is not part of the backbone
and is dropped. The single input channel becomes three equal ones (each a third of the kernel), so
a gray image given as three equal channels gives the original convolution exactly.

torchxrayvision scales its input to [-1024, 1024] (``xrv.datasets.normalize(img, 255)``), not
ImageNet's mean and std: the converted file carries a sidecar (``<file>.json``) that records this,
and a member built from the file normalises with :func:`data.runtime.layers.xrv_normalization`
instead of ImageNet's (ensemble.members reads the sidecar).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from data.errors import CxrError

#: Block sizes of DenseNet121 (torchvision denseblock1..4 = Keras conv2..conv5).
BLOCKS = (6, 12, 24, 16)
#: The input scaling a weights file expects, recorded in its sidecar: "xrv" for a converted
#: torchxrayvision backbone, "keras" for the member's own keras.applications preprocessing (what
#: ImageNet weights and the encoder of a cxr U-Net, `cxr export --format encoder`, expect).
XRV_SCALING = "xrv"
KERAS_SCALING = "keras"
SCALINGS = {XRV_SCALING: "gray = mean(R, G, B); x = gray / 255 * 2048 - 1024 (torchxrayvision's range [-1024, 1024])",
            KERAS_SCALING: "the member's own keras.applications preprocessing (DenseNet121: x / 255, ImageNet "
                           "mean and std per channel)"}
SIDECAR_SUFFIX = ".json"


class ConvertError(CxrError, ValueError):
    """A state dict that is not a DenseNet121 or cannot be read; the message names the file and the fix."""


def keras_targets() -> dict[str, tuple[str, str]]:
    """torchvision DenseNet121 ``features.*`` key → (Keras layer name, what it is: conv or a BN part)."""
    out: dict[str, tuple[str, str]] = {"features.conv0.weight": ("conv1_conv", "kernel")}
    out.update(_bn("features.norm0", "conv1_bn"))
    for b, n in enumerate(BLOCKS, start=1):
        for i in range(1, n + 1):
            t, k = f"features.denseblock{b}.denselayer{i}", f"conv{b + 1}_block{i}"
            out.update(_bn(f"{t}.norm1", f"{k}_0_bn"))
            out[f"{t}.conv1.weight"] = (f"{k}_1_conv", "kernel")
            out.update(_bn(f"{t}.norm2", f"{k}_1_bn"))
            out[f"{t}.conv2.weight"] = (f"{k}_2_conv", "kernel")
        if b < len(BLOCKS):
            out.update(_bn(f"features.transition{b}.norm", f"pool{b + 1}_bn"))
            out[f"features.transition{b}.conv.weight"] = (f"pool{b + 1}_conv", "kernel")
    out.update(_bn("features.norm5", "bn"))
    return out


def _bn(torch_prefix: str, layer: str) -> dict[str, tuple[str, str]]:
    return {f"{torch_prefix}.{p}": (layer, p) for p in ("weight", "bias", "running_mean", "running_var")}


def normalise_keys(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keys as torchvision writes them today: drop a ``module.``/``model.`` prefix (DataParallel,
    wrappers) and old torchvision's ``norm.1`` / ``conv.1`` spelling; values as numpy arrays."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^(module\.|model\.)+", "", key)
        key = re.sub(r"\.(norm|relu|conv)\.(\d)", r".\1\2", key)
        out[key] = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    return out


def convert_densenet121(state: Mapping[str, Any], *, source: str = "<state dict>", input_size: int = 224):
    """A Keras DenseNet121 backbone (no top, 3 input channels) carrying the state dict's weights.

    ConvertError naming ``source`` when a tensor is missing or has the wrong shape.
    """
    import keras

    state = normalise_keys(state)
    targets = keras_targets()
    missing = [k for k in targets if k not in state]
    if missing:
        raise ConvertError(f"{source}: not a torchvision-layout DenseNet121 state dict; missing {len(missing)} "
                           f"tensor(s), e.g. {', '.join(missing[:3])}")
    backbone = keras.applications.DenseNet121(weights=None, include_top=False,
                                              input_shape=(input_size, input_size, 3))
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for key, (layer, part) in targets.items():
        by_layer.setdefault(layer, {})[part] = state[key]
    for name, parts in by_layer.items():
        layer = backbone.get_layer(name)
        if "kernel" in parts:
            kernel = parts["kernel"].transpose(2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out)
            if name == "conv1_conv" and kernel.shape[2] == 1:
                kernel = np.repeat(kernel / 3.0, 3, axis=2)  # one gray channel → three equal ones
            values = [kernel]
        else:
            values = [parts["weight"], parts["bias"], parts["running_mean"], parts["running_var"]]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [tuple(v.shape) for v in values] != expected:
            raise ConvertError(f"{source}: {name} has shapes {[v.shape for v in values]}, the Keras layer "
                               f"{expected}; is this DenseNet121 (not 169/201)?")
        layer.set_weights([v.astype(np.float32) for v in values])
    return backbone


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A PyTorch state dict (.pt, .pth, .bin; needs torch) or a .npz of the same tensors.

    A whole pickled model (what torchxrayvision's download is) gives its ``state_dict()``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path}: reading PyTorch files needs torch (pip install torch), or save the "
                           "state dict as .npz (numpy.savez) where torch is installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # a whole model pickles more than tensors
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConvertError(f"{path}: not a readable PyTorch file ({err})") from None
    if hasattr(obj, "state_dict"):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def convert_weights(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert ``src`` into the Keras weights file ``out`` (``*.weights.h5``) and its sidecar
    ``out.json`` (source, sha256, input scaling, dropped tensors); returns the sidecar's record."""
    from data.files import write_json
    from data.runtime.bundle import sha256_file

    src, out = Path(src), Path(out)
    if not out.name.endswith(".weights.h5"):
        raise ConvertError(f"{out}: name the output *.weights.h5 (Keras weights file)")
    state = normalise_keys(read_state_dict(src))  # once: the conversion and the list of dropped tensors share it
    backbone = convert_densenet121(state, source=str(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(out)
    used = set(keras_targets())
    record = {
        "architecture": "densenet121", "source": str(src), "source_sha256": sha256_file(src),
        "input_scaling": XRV_SCALING, "input_scaling_formula": SCALINGS[XRV_SCALING],
        "first_conv": "one gray channel → three channels, each kernel / 3",
        # BatchNorm's step counters are bookkeeping, not weights
        "dropped": sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked")),
        "weights_sha256": sha256_file(out),
    }
    write_json(sidecar_path(out), record)
    return record


def sidecar_path(weights_file: str | os.PathLike[str]) -> Path:
    return Path(str(weights_file) + SIDECAR_SUFFIX)


def input_scaling(weights_file: str | os.PathLike[str] | None) -> str | None:
    """The input scaling a weights file's sidecar records ("xrv" or "keras"); None for a file without one."""
    if weights_file in (None, "imagenet"):
        return None
    side = sidecar_path(weights_file)
    if not side.is_file():
        return None
    try:
        scaling = json.loads(side.read_text(encoding="utf-8")).get("input_scaling")
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{side}: unreadable sidecar ({err}); write the file again with the command that made "
                          "it (cxr convert, or cxr export --format encoder)") from None
    if scaling not in SCALINGS:
        raise ConvertError(f"{side}: unknown input_scaling {scaling!r} (known: {', '.join(SCALINGS)}); write the "
                           "file again with the command that made it (cxr convert, or cxr export --format encoder)")
    return scaling
