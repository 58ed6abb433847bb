"""Counter-based randomness: random integers as a pure function of (seed, epoch, sample index).

The mixer is the splitmix64 finalizer (Steele, Lea and Flood, 2014). It is written twice: on Python
ints (for generator seeds) and on int64 tensors (one random number per sample, no global RNG). The
tensor version relies on int64 multiplication wrapping modulo 2**64 and masks every right shift,
because ``>>`` on a negative int64 is arithmetic (it copies the sign bit).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def to_signed64(value: int) -> int:
    """The int64 whose two's-complement bits equal ``value`` modulo 2**64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64_int(value: int) -> int:
    """splitmix64 finalizer on a Python int; returns an unsigned 64-bit int."""
    z = value & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed (valid for ``torch.Generator.manual_seed``) that depends on every part."""
    state = 0
    for part in parts:
        state = mix64_int((state + GOLDEN_GAMMA + (part & _MASK64)) & _MASK64)
    return state >> 1


def _logical_shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on an int64 tensor (bit-identical to ``mix64_int``, as signed int64)."""
    x = x ^ _logical_shift_right(x, 30)
    x = x * to_signed64(_MUL1)
    x = x ^ _logical_shift_right(x, 27)
    x = x * to_signed64(_MUL2)
    return x ^ _logical_shift_right(x, 31)


def sample_keys(index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """One 64-bit key per sample, a pure function of (seed, epoch, index)."""
    run_key = to_signed64(derive_seed(seed, epoch))
    index = index.to(torch.int64)
    return mix64(index * to_signed64(GOLDEN_GAMMA) + run_key)


def random_below(keys: torch.Tensor, stream: int, bound: int) -> torch.Tensor:
    """Integers in ``[0, bound)``, one per key; ``stream`` picks an independent draw per key.

    Uses the top 53 bits modulo ``bound`` (bias below 2**-40 for the small bounds used here).
    """
    bits = mix64(keys + to_signed64(GOLDEN_GAMMA * (stream + 1)))
    return _logical_shift_right(bits, 11) % bound
