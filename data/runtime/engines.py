"""ONNX export of a model bundle, and the ONNX Runtime forward pass used in its place.

``ensure_onnx(directory, model, ...)`` returns an :class:`OnnxForward` for a bundle, exporting
``model.onnx`` next to ``model.keras`` on first use. The export is trusted only while its
record (``model.onnx.json``) names the sha256 of the ``model.keras`` it came from and of the
``model.onnx`` written; anything else re-exports. Every export is checked against Keras on a
sample batch before it is kept.

``ensure_int8`` adds ``model.int8.onnx``: ONNX Runtime static int8 quantisation of that export,
calibrated on images the caller picks (training images; `cxr export --format onnx-int8`). It
cannot be checked to float precision, so its record keeps the distance to the float outputs
and its accuracy is measured with ``cxr evaluate --engine onnx-int8``. It is only loaded while
its record matches ``model.keras`` and itself; it is never made implicitly.

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

from data.files import write_json
from data.runtime.bundle import MODEL_FILE, BundleError, sha256_file

ONNX_FILE = "model.onnx"
ONNX_RECORD = "model.onnx.json"
INT8_FILE = "model.int8.onnx"
INT8_RECORD = "model.int8.onnx.json"
#: Largest |keras - onnx| accepted on the check batch (probabilities and feature maps).
DEFAULT_ATOL = 1e-4


class ExportError(BundleError):
    """An export that failed or does not reproduce the Keras model."""


class OnnxForward:
    """An ONNX Runtime session with Keras-like outputs: ``forward(x) -> {output name: array}``."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, engine: str = "onnx") -> None:
        import onnxruntime as ort

        self.engine = engine
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


def export_onnx(model, path: str | os.PathLike[str], *, sample: np.ndarray,
                atol: float = DEFAULT_ATOL) -> dict[str, Any]:
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
    write_json(record_path, sort_keys=True, data={
        "source_sha256": source,
        "onnx_sha256": sha256_file(onnx_path),
        "onnxruntime": metadata.version("onnxruntime"),
        "tf2onnx": metadata.version("tf2onnx"),
        **checked,
    })
    return OnnxForward(onnx_path, threads=threads)


def quantize_int8(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  calibration: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime static int8 quantisation of a float export, calibrated on ``calibration`` images.

    QDQ format, int8 weights per output channel, uint8 activations with min-max ranges from the
    calibration batch (the usual choice for x86 CPUs: u8·s8 products, VNNI where present). The
    float graph is first shape-inferred and optimised (``quant_pre_process``). The calibrator
    keeps only each tensor's min and max per image, so memory stays small without ORT's
    ``CalibMaxIntermediateOutputs`` (which, in onnxruntime 1.32, discards the chunks it clears
    instead of merging their ranges: microsoft/onnxruntime#18893). Returns how far the int8
    outputs are from the float ones on (up to 8 of) the calibration images. ExportError (nothing
    written) when quantisation fails or gives non-finite outputs.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"{out_path}: int8 calibration needs a batch of images, got shape {calibration.shape}")
    fp32 = OnnxForward(onnx_path)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {fp32.input_name: row}

    pre = out_path.with_name(out_path.name + ".pre.tmp")
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        quant_pre_process(str(onnx_path), str(pre))
        quantize_static(str(pre), str(tmp), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        check = calibration[:8]
        ref, got = fp32(check), OnnxForward(tmp)(check)
        diffs = {k: float(np.max(np.abs(ref[k] - got[k]))) for k in ref}
        if not all(np.isfinite(v) for v in diffs.values()):
            raise ExportError(f"{out_path}: int8 outputs are not finite ({diffs}); keep the float engine")
    except ExportError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - the quantiser raises many types; one clear error for all
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{out_path}: int8 quantisation failed ({type(err).__name__}: {err})") from err
    finally:
        pre.unlink(missing_ok=True)
    os.replace(tmp, out_path)
    return {"calibration_images": int(len(calibration)), "check_batch": int(len(check)),
            "max_abs_diff_vs_float": max(diffs.values()), "per_output_vs_float": diffs}


def ensure_int8(directory: str | os.PathLike[str], model, *, image_size: int, calibration: np.ndarray,
                calibration_files: list[str], source_sha256: str | None = None) -> dict[str, Any]:
    """Write ``model.int8.onnx`` (+ record) into a bundle from its float export; returns the record.

    Always quantises anew: the calibration set is the caller's choice, and the record names it.
    """
    from importlib import metadata

    directory = Path(directory)
    source = source_sha256 or sha256_file(directory / MODEL_FILE)
    fp32 = ensure_onnx(directory, model, image_size=image_size, source_sha256=source)
    checked = quantize_int8(fp32.path, directory / INT8_FILE, calibration)
    record = {
        "source_sha256": source,
        "onnx_sha256": sha256_file(fp32.path),
        "int8_sha256": sha256_file(directory / INT8_FILE),
        "onnxruntime": metadata.version("onnxruntime"),
        "method": "static QDQ, per-channel int8 weights, uint8 activations, min-max calibration",
        "calibration_files": calibration_files,
        **checked,
    }
    write_json(directory / INT8_RECORD, record, sort_keys=True)
    return record


def load_int8(directory: str | os.PathLike[str], *, source_sha256: str | None = None,
              threads: int | None = None) -> OnnxForward:
    """The int8 forward pass of a bundle; BundleError naming the fix when it is missing or stale."""
    directory = Path(directory)
    path, record_path = directory / INT8_FILE, directory / INT8_RECORD
    fix = f"run `cxr export --model {directory} --format onnx-int8 --calibration TRAINING_IMAGES`"
    if not (path.is_file() and record_path.is_file()):
        raise BundleError(f"{directory}: no int8 export ({INT8_FILE}); {fix}")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise BundleError(f"{record_path}: unreadable record; {fix}") from None
    source = source_sha256 or sha256_file(directory / MODEL_FILE)
    if record.get("source_sha256") != source:
        raise BundleError(f"{path}: made from another {MODEL_FILE} (the model changed since); {fix}")
    if record.get("int8_sha256") != sha256_file(path):
        raise BundleError(f"{path}: does not match its record (edited or truncated); {fix}")
    return OnnxForward(path, threads=threads, engine="onnx-int8")


ENGINES = ("keras", "onnx", "onnx-int8")


def select_engine(engine: str, directory: str | os.PathLike[str], model, *, image_size: int,
                  threads: int | None = None, source_sha256: str | None = None) -> OnnxForward | None:
    """None for "keras" (use the model itself); ONNX Runtime for "onnx" (float, exported on first
    use) and "onnx-int8" (made beforehand by `cxr export --format onnx-int8`, since it needs images)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if engine == "keras":
        return None
    if engine == "onnx-int8":
        return load_int8(directory, source_sha256=source_sha256, threads=threads)
    return ensure_onnx(directory, model, image_size=image_size, threads=threads, source_sha256=source_sha256)


class EngineChoice:
    """The engine switch of a loaded bundle (data.runtime.loaded.LoadedBundle: ``path``, ``model``,
    ``image_size``, ``checkpoint_sha256``, ``onnx``)."""

    onnx: OnnxForward | None

    @property
    def engine(self) -> str:
        return "keras" if self.onnx is None else self.onnx.engine

    def use_engine(self, engine: str, *, threads: int | None = None) -> None:
        """"keras" (the loaded model), "onnx" (ONNX Runtime; exported next to the model on first use)
        or "onnx-int8" (ONNX Runtime on the int8 export made by `cxr export --format onnx-int8`)."""
        self.onnx = select_engine(engine, self.path, self.model, image_size=self.image_size, threads=threads,
                                  source_sha256=self.checkpoint_sha256)
