"""The backend-neutral batch stream behind ``data.datasets.make_dataset`` on PyTorch and JAX.

Kept apart from ``data.datasets`` so that reading folders and manifests never imports Keras.
"""

from __future__ import annotations

import copy

import keras
import numpy as np

from data.datasets import DatasetError


class RecordBatches(keras.utils.PyDataset):
    """The backend-neutral stream (keras.utils.PyDataset): same elements, order and seeds as the
    tf.data one. Batch k of an epoch holds examples ``order[k·B:(k+1)·B]`` minus unreadable files.
    Keras calls ``on_epoch_end`` after each epoch; a plain ``for`` loop over it is one epoch too."""

    def __init__(self, loader, *, batch_size: int, shuffle: bool, one_hot: bool,
                 workers: int = 1) -> None:
        super().__init__(workers=workers, use_multiprocessing=False)
        self.loader, self.batch_size, self.shuffle, self.one_hot = loader, batch_size, shuffle, one_hot
        self.epoch = 0
        self._fns: list = []
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return -(-len(self.loader.records) // self.batch_size)

    def _order(self) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != self.epoch:
            self._order_cache = (self.epoch, self.loader.order(self.epoch, self.shuffle))
        return self._order_cache[1]

    def __getitem__(self, k: int):
        idx = self._order()[k * self.batch_size:(k + 1) * self.batch_size]
        xs, ys = [], []
        for i in idx:
            x, y, ok = self.loader(int(i), self.epoch)
            if ok:
                xs.append(x)
                ys.append(self.loader.target(int(i), y, self.one_hot))
        if not xs:
            names = ", ".join(str(self.loader.records[int(i)].path) for i in idx[:3])
            raise DatasetError(f"no readable image in batch {k} ({names}…); see the failures for the reasons")
        batch = (np.stack(xs), np.stack(ys))
        for fn in self._fns:
            batch = fn(*batch)
        return batch

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]
        self.on_epoch_end()

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def map(self, fn) -> "RecordBatches":
        """A view whose batches are ``fn(x, y)`` (its own epoch counter, same files and seeds)."""
        view = copy.copy(self)
        view._fns = [*self._fns, fn]
        return view
