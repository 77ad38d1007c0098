"""Parallel training: planned on paper, and run.

- memory.py: per-GPU memory (parameters, gradients, optimizer state, activations) and
  communication per step of a data/tensor/expert-parallel layout (`mistura plan --memory`)
- distributed.py: data-parallel training across the processes torchrun starts (parallel.data_parallel:
  ddp): the process group, the rank helpers and each process's slice of the global batch
"""
