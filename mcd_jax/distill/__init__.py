"""Distillation of masked diffusion models: the MCD loss, the SDTT-style baseline, rounds."""
