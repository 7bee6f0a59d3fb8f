"""Data layer: the input contract, decoding, preprocessing, augmentation, datasets and splits."""
