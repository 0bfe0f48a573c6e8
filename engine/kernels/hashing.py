"""Counter-based hashing: deterministic pseudo-random numbers from integer keys.

A split must be a pure function of (block index, seed) so that every worker, every
scheduler and every chunking computes the same assignment without communication.
SplitMix64 (Steele, Lea and Flood 2014) gives well-mixed 64-bit values from a counter
and is simple to vectorise in numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["splitmix64", "hash_index", "uniform_from_index"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray | np.integer) -> np.ndarray:
    """Finalise ``x`` (uint64) with the SplitMix64 mixer; wraps modulo 2**64."""
    z = np.asarray(x, dtype=np.uint64) + _GAMMA
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_index(seed: int, *indices: np.ndarray) -> np.ndarray:
    """Hash a seed and broadcastable integer index arrays into uint64 values.

    The result depends only on the values, never on array layout or chunking.
    """
    h = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    for idx in indices:
        with np.errstate(over="ignore"):
            h = splitmix64(h ^ splitmix64(np.asarray(idx).astype(np.uint64)))
    return h


def uniform_from_index(seed: int, *indices: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) keyed by ``(seed, *indices)`` (53 bits of the hash)."""
    h = hash_index(seed, *indices)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
