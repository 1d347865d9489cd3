"""Primitives with no verl, Ray or hydra in them, imported by every feature above and importing
nothing of this project outside `core`: distributions, random streams, token draws and padding,
prompts, model loading with one end-of-sequence rule, atomic files, config checks, progress lines,
where the configs are."""
