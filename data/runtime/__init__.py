"""Model runtime, the part of the leaf layer that knows about models: bundles (``model.keras`` and
its checked sidecar), the loaded-bundle base shared by the classifier and the segmenter, the
inference engines (Keras, ONNX Runtime float and int8), the training scaffolding both trainers
share, weight files, in-graph layers and TensorFlow settings.

It builds on data's input modules (spec, io, preprocess, stream, ...), which never import it
(an import-linter contract in setup.cfg).
"""
