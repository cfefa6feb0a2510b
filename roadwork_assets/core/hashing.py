"""Hash a key into [0, 1): a pure function of the key alone.

An assignment made from such numbers is stable: adding or removing other keys never
moves a key's number, so it never moves the key's bucket. Used by the dataset split
(`core.data.splits`, u = hash of seed and group key) and by the val_calib fit /
threshold split by group (`core.calibration.policies`, u = hash of salt and group key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def unit_hash(keys: Iterable[str], *, bits: int = 53) -> np.ndarray:
    """u = (the first `bits` bits of sha256(key)) / 2**bits for each key, float64 in [0, 1).

    bits <= 53 keeps u exact in a float64. The dataset split uses 53; the val_calib
    group split has always used 52 (the first 13 hex digits), and keeps them so that a
    policy refitted on the same data splits the same way.
    """
    if not 1 <= bits <= 53:
        raise ValueError(f"bits must be in [1, 53]; got {bits}")
    scale = float(1 << bits)
    return np.array(
        [(int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") >> (64 - bits)) / scale
         for k in keys],
        dtype=np.float64,
    )
