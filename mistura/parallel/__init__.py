"""Parallel training and inference: planned on paper, and run.

- memory.py: per-GPU memory (parameters, gradients, optimizer state, activations) and
  communication per step of a data/tensor/expert-parallel layout (`mistura plan --memory`)
- distributed.py: data-parallel training across the processes torchrun starts (parallel.data_parallel):
  the process group, the rank helpers and each process's slice of the global batch
- fsdp.py: fully sharded data parallelism (FSDP2's fully_shard, ZeRO-3)
- dcp.py: distributed checkpoints (torch.distributed.checkpoint), each process writing its shards
- expert.py: expert parallelism: routed experts split across ranks, tokens sent to them by all_to_all
- tensor.py: tensor parallelism (DTensor): heads, hidden channels and vocabulary split across ranks
"""
