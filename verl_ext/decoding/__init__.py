"""Two-model decoding: selective token replacement (paper Alg. 1) and selective extrapolation (Eq. 7).

- `criteria`: the gate criteria f(ŷ) (entropy, KL, Δlog p, random, none, all).
- `sampler`: the two-stage sampler (propose, gate, resample) as pure tensor functions.
- `rng`: per-sequence counter-based random streams (batch-independent draws).
- `engine`: `TwoModelDecoder`, the step-by-step loop: continuous batching with one KV cache per model.
- `static`: `StaticTwoModelDecoder`, the step loop on static KV caches with one fixed-shape step
  (a CUDA graph on a GPU); the same tokens as `TwoModelDecoder`.
- `experimental`: `SpeculativeTwoModelDecoder`, exact speculative rounds (k drafts, adaptive k, π_RL
  drafts). Opt-in only: slower than the step loop on a measured GPU (DESIGN.md §6).
- `sweep`: the hydra entry point of the criterion × threshold sweeps.
"""

from verl_ext.decoding.criteria import CRITERIA, get_criterion
from verl_ext.decoding.engine import DecodeResult, Request, TwoModelDecoder, replace_ratio
from verl_ext.decoding.sampler import DecodingRule
from verl_ext.decoding.static import StaticTwoModelDecoder

__all__ = ["CRITERIA", "DecodeResult", "DecodingRule", "Request", "StaticTwoModelDecoder", "TwoModelDecoder", "get_criterion", "replace_ratio"]
