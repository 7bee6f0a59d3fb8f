"""ONNX export of a model bundle, and the ONNX Runtime forward pass used in its place.

``ensure_onnx(directory, model, ...)`` returns an :class:`OnnxForward` for a bundle, exporting
``model.onnx`` next to ``model.keras`` on first use. The export is trusted only while its
record (``model.onnx.json``) names the sha256 of the ``model.keras`` it came from and of the
``model.onnx`` written; anything else re-exports. Every export is checked against Keras on a
sample batch before it is kept.

Known snag, handled here: Keras' ONNX export (tf2onnx) declares the constants of a
``Normalization`` layer (EfficientNetB0's mean and variance) as extra graph inputs. Inputs that
no node reads are dropped; any that are read are folded back into initializers from the
layer's own weights. The export is then checked numerically either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data.bundle import MODEL_FILE, BundleError, sha256_file, write_json_atomic

ONNX_FILE = "model.onnx"
ONNX_RECORD = "model.onnx.json"
#: Largest |keras - onnx| accepted on the check batch (probabilities and feature maps).
DEFAULT_ATOL = 1e-4


class ExportError(BundleError):
    """An export that failed or does not reproduce the Keras model."""


class OnnxForward:
    """An ONNX Runtime session with Keras-like outputs: ``forward(x) -> {output name: array}``."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportError(f"{path}: expected one image input, found {[i.name for i in inputs]}; re-export it")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, outs))


def _normalization_layers(model) -> list[Any]:
    import keras

    found = []

    def visit(layer):
        if isinstance(layer, keras.layers.Normalization):
            found.append(layer)
        for sub in getattr(layer, "layers", []) or []:
            visit(sub)

    visit(model)
    return found


def fold_captured_inputs(proto, model, image_input: str) -> list[str]:
    """Turn tf2onnx's extra Normalization inputs back into initializers; returns the folded names."""
    from onnx import numpy_helper

    extra = [i for i in proto.graph.input if i.name != image_input]
    if not extra:
        return []
    used = {name for node in proto.graph.node for name in node.input}
    dangling = [i.name for i in extra if i.name not in used]  # declared but read by no node: just drop them
    extra = [i for i in extra if i.name in used]
    if not extra:
        keep = [i for i in proto.graph.input if i.name not in dangling]
        del proto.graph.input[:]
        proto.graph.input.extend(keep)
        return dangling
    norms = _normalization_layers(model)
    if len(norms) != 1:
        raise ExportError(f"cannot fold {len(extra)} captured input(s) {[i.name for i in extra]}: "
                          f"the model has {len(norms)} Normalization layers (expected 1)")
    layer = norms[0]
    values = {"Sub/y:0": np.asarray(layer.mean, np.float32), "Sqrt/x:0": np.asarray(layer.variance, np.float32)}
    folded = []
    for inp in extra:
        key = next((k for k in values if inp.name.endswith(k)), None)
        if key is None:
            raise ExportError(f"exported graph has an unexpected input {inp.name!r}")
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        value = values[key].reshape(dims)
        proto.graph.initializer.append(numpy_helper.from_array(value, name=inp.name))
        folded.append(inp.name)
    keep = [i for i in proto.graph.input if i.name not in folded and i.name not in dangling]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    return folded + dangling


def export_onnx(model, path: str | os.PathLike[str], *, sample: np.ndarray, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Export a Keras model to ``path`` and check it on ``sample``; returns what was checked.

    ExportError (nothing written at ``path``) when the export fails or differs by more than ``atol``.
    """
    import onnx

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    sample = np.asarray(sample, np.float32)
    ref = model.predict_on_batch(sample)  # also builds the model: Keras wants one call before export
    ref = ref if isinstance(ref, dict) else {"output": ref}
    try:
        model.export(str(tmp), format="onnx", verbose=False)
    except Exception as err:  # noqa: BLE001 - tf2onnx raises many types; one clear error for all
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: ONNX export failed ({type(err).__name__}: {err})") from err
    proto = onnx.load(str(tmp))
    image_input = proto.graph.input[0].name
    folded = fold_captured_inputs(proto, model, image_input)
    onnx.save(proto, str(tmp))
    try:
        got = OnnxForward(tmp)(sample)
        if len(ref) == 1 and len(got) == 1:
            got = {next(iter(ref)): next(iter(got.values()))}
        missing = set(ref) - set(got)
        if missing:
            raise ExportError(f"{path}: exported graph lacks outputs {sorted(missing)}")
        diffs = {k: float(np.max(np.abs(np.asarray(ref[k]) - got[k]))) for k in ref}
        worst = max(diffs.values())
        if not worst <= atol:
            raise ExportError(f"{path}: ONNX outputs differ from Keras by {worst:.2e} (> {atol:.0e}): {diffs}")
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return {"max_abs_diff": worst, "per_output": diffs, "folded_inputs": folded, "check_batch": int(len(sample))}


def ensure_onnx(directory: str | os.PathLike[str], model, *, image_size: int, sample: np.ndarray | None = None,
                threads: int | None = None, source_sha256: str | None = None) -> OnnxForward:
    """The ONNX forward pass of a bundle, exporting ``model.onnx`` next to it on first use.

    An export is reused only while its record matches both files' sha256; otherwise it is
    redone. BundleError when the directory cannot be written (export it once with a user that
    can, or use the Keras engine).
    """
    from importlib import metadata

    directory = Path(directory)
    onnx_path, record_path = directory / ONNX_FILE, directory / ONNX_RECORD
    source = source_sha256 or sha256_file(directory / MODEL_FILE)  # a loaded bundle passes its checked hash
    if onnx_path.is_file() and record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            record = {}
        if record.get("source_sha256") == source and record.get("onnx_sha256") == sha256_file(onnx_path):
            return OnnxForward(onnx_path, threads=threads)
    if not os.access(directory, os.W_OK):
        raise BundleError(f"{directory}: not writable, so the ONNX export cannot be cached there; run "
                          f"`cxr export --model {directory}` as a user who can write it, or use --engine keras")
    if sample is None:
        rng = np.random.default_rng(0)
        sample = rng.uniform(0, 255, (2, image_size, image_size, 3)).astype(np.float32)
    checked = export_onnx(model, onnx_path, sample=sample)
    write_json_atomic(record_path, {
        "source_sha256": source,
        "onnx_sha256": sha256_file(onnx_path),
        "onnxruntime": metadata.version("onnxruntime"),
        "tf2onnx": metadata.version("tf2onnx"),
        **checked,
    })
    return OnnxForward(onnx_path, threads=threads)


ENGINES = ("keras", "onnx")


def select_engine(engine: str, directory: str | os.PathLike[str], model, *, image_size: int,
                  threads: int | None = None, source_sha256: str | None = None) -> OnnxForward | None:
    """None for "keras" (use the model itself); the ONNX forward pass for "onnx"."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "keras":
        return None
    return ensure_onnx(directory, model, image_size=image_size, threads=threads, source_sha256=source_sha256)


class EngineChoice:
    """Mixin for loaded bundles (``path``, ``model``, ``image_size``, ``checkpoint_sha256``, ``onnx``): the engine switch."""

    onnx: OnnxForward | None

    @property
    def engine(self) -> str:
        return "keras" if self.onnx is None else "onnx"

    def use_engine(self, engine: str, *, threads: int | None = None) -> None:
        """"keras" (the loaded model) or "onnx" (ONNX Runtime; exported next to the model on first use)."""
        self.onnx = select_engine(engine, self.path, self.model, image_size=self.image_size, threads=threads,
                                  source_sha256=self.checkpoint_sha256)
