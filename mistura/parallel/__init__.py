"""Parallel training on paper.

- memory.py: per-GPU memory (parameters, gradients, optimizer state, activations) and
  communication per step of a data/tensor/expert-parallel layout (`mistura plan --memory`)
"""
