"""Data layer, the leaf of the package: the input contract (spec), decoding (io), preprocessing,
augmentation, datasets, inference streams, splits, data checks, masks and file writers. The model
runtime that builds on it (bundles, engines, training scaffolding) is the ``data.runtime`` subpackage."""
