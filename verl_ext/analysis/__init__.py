"""Offline token-level analysis of an RLVR model against its base model (Δlog p, entropy, KL).

- `token_metrics`: the exact per-token math and the chunked two-model scorer.
- `logp_diff`: the hydra command (sample or read generations, score them in shards, plot).
- `plots`: histograms, probability-by-Δlogp bins, top-token tables and the markdown summary.
"""
