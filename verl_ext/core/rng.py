"""Counter-based random numbers: one independent stream per sequence, drawn on the device.

Every random draw of the decoder is a pure function of (seed, sequence id, response position,
purpose), so a sequence gets the same numbers whatever batch it runs in, in whatever order, and
whether the step-by-step loop or the (experimental) speculative rounds generate it. That makes
batched == unbatched and speculative == step-by-step hold token for token (up to floating-point ties), not
only in distribution.

The mixing function is SplitMix64's finaliser (Steele, Lea & Flood 2014) on int64 tensors, whose
multiplication wraps modulo 2^64 on CPU and CUDA; right shifts are made logical by masking.
"""

from __future__ import annotations

import torch

# Purposes of a draw at one position: each is its own stream.
STREAM_PROPOSAL = 0  # ŷ ~ π_proposal (π_B in Alg. 1)
STREAM_GATE = 1  # u ~ U(0,1) for the `random` criterion
STREAM_RESAMPLE = 2  # y ~ q (π_RL or π_Extra) where the gate fired
NUM_STREAMS = 3
# Streams drawn only by the experimental scorer-drafted rounds (`experimental.py`, draft_model="scorer").
# They live in a second lane (the same counters under a re-mixed key), so the three above keep their values.
STREAM_SCORER_DRAFT = NUM_STREAMS  # the scorer's draft token

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """The int64 with the same bit pattern as the uint64 `c`."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of the uint64 bit pattern held in an int64 tensor."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """z = x + φ; z = (z ⊕ z≫30)·M1; z = (z ⊕ z≫27)·M2; return z ⊕ z≫31   (all mod 2^64)."""
    z = x.to(torch.int64) + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def sequence_keys(seed: int, stream_ids: torch.Tensor) -> torch.Tensor:
    """key_i = mix(mix(seed) ⊕ id_i): the root of sequence i's random stream."""
    root = splitmix64(torch.tensor(_signed(seed & _MASK64), dtype=torch.int64, device=stream_ids.device))
    return splitmix64(root ^ stream_ids.to(torch.int64))


def uniforms(keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """u = (mix(key + mix(NUM_STREAMS·position + slot)) ≫ 11) · 2^-53 ∈ [0, 1), float64, with
    (lane, slot) = divmod(stream, NUM_STREAMS) and key := mix(key ⊕ lane) for lanes > 0.

    `keys` and `positions` broadcast (e.g. keys [B, 1] with positions [B, k]).
    """
    lane, stream = divmod(stream, NUM_STREAMS)
    if lane:
        keys = splitmix64(keys ^ lane)
    counter = splitmix64(positions.to(torch.int64) * NUM_STREAMS + stream)
    bits = _shr(splitmix64(keys + counter), 11)
    return bits.to(torch.float64) * (2.0**-53)
