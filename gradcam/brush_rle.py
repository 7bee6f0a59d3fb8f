"""Label Studio brush RLE, vectorised with numpy.

Format (label-studio-converter ``brush.encode_rle``): a bit stream of a 32-bit value count,
5 bits word size − 1, four 4-bit run-size classes − 1 ([3, 4, 8, 16]), then per run either
``0 00 000 <8-bit value>`` (a single value) or ``1 <2-bit class> <length − 1> <8-bit value>``,
runs over 65 536 split; zero-padded to whole bytes (a full extra zero byte when already
aligned, as the reference does). The encoded array is the RGBA image flattened, every
channel equal to the mask value (0 or 255).

The reference encoder concatenates Python strings bit by bit; this one builds the same bytes
with array operations (tests check byte equality against the reference and its decoder).
"""

from __future__ import annotations

import numpy as np

_SIZES = (3, 4, 8, 16)
_WORD = 8


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(values)
    change = np.flatnonzero(values[1:] != values[:-1])
    ends = np.append(change, n - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths.astype(np.int64), values[ends].astype(np.int64)


def encode(values: np.ndarray) -> list[int]:
    """Encode a 1-D uint8 array; returns the byte values as a list of ints (Label Studio's ``rle``)."""
    arr = np.asarray(values, dtype=np.uint8).ravel()
    lengths, vals = _runs(arr) if len(arr) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    # Split runs longer than 2^16 into 2^16-long pieces plus a remainder, like the reference.
    pieces = np.maximum((lengths - 1) // (1 << 16), 0)
    rep = pieces + 1
    lens = np.repeat(lengths, rep)
    vals = np.repeat(vals, rep)
    first = np.repeat(np.cumsum(rep) - rep, rep)
    k = np.arange(len(lens)) - first  # index of the piece within its run
    last = k == np.repeat(rep - 1, rep)
    lens = np.where(last, lens - (1 << 16) * k, 1 << 16)
    single = lens == 1
    cls = np.select([lens <= 8, lens <= 16, lens <= 256], [0, 1, 2], 3)
    size = np.asarray(_SIZES)[cls]
    # Fields per run: flag(1) class(2) length(size) value(8); singles: 0 00 000 value.
    flag = np.where(single, 0, 1)
    cls = np.where(single, 0, cls)
    size = np.where(single, 3, size)
    length_field = np.where(single, 0, lens - 1)
    n_runs = len(lens)
    field_vals = np.stack([flag, cls, length_field, vals], axis=1).ravel()
    field_widths = np.stack([np.ones(n_runs, np.int64), np.full(n_runs, 2), size, np.full(n_runs, _WORD)],
                            axis=1).ravel()
    header_vals = np.array([len(arr), _WORD - 1, *[s - 1 for s in _SIZES]], dtype=np.int64)
    header_widths = np.array([32, 5, 4, 4, 4, 4], dtype=np.int64)
    fv = np.concatenate([header_vals, field_vals]).astype(np.uint64)
    fw = np.concatenate([header_widths, field_widths])
    total = int(fw.sum())
    owner = np.repeat(np.arange(len(fw)), fw)
    pos = np.arange(total) - np.repeat(np.cumsum(fw) - fw, fw)
    shift = (fw[owner] - 1 - pos).astype(np.uint64)
    bits = ((fv[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    pad = 8 - total % 8  # 1..8, as the reference pads
    bits = np.concatenate([bits, np.zeros(pad, np.uint8)])
    return np.packbits(bits).tolist()


def decode(rle: list[int] | bytes) -> np.ndarray:
    """Decode Label Studio brush RLE back to the flat uint8 array."""
    bits = np.unpackbits(np.frombuffer(bytes(rle), dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        chunk = bits[pos : pos + n]
        pos += n
        if len(chunk) < n:
            raise ValueError("brush RLE ends early")
        return int("".join(map(str, chunk.tolist())) or "0", 2)

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        is_run = read(1)
        j = i + 1 + read(sizes[read(2)])
        if is_run:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A (H, W) binary mask → Label Studio brush RLE of its RGBA image (all channels 0 or 255)."""
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    return encode(np.repeat(m.ravel(), 4))


def rle_to_mask(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE → (H, W) bool mask (alpha channel > 0)."""
    flat = decode(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[..., 3] > 0
