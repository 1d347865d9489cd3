"""Directional RLVR on verl: advantage reweighting, Δlog p analysis, two-model decoding, evaluation.

Importing this package does not import verl; `verl_ext.verl_plugin` registers everything with
verl and is loaded by verl itself (entry point group `verl.plugins`).
"""

__version__ = "0.1.0"
