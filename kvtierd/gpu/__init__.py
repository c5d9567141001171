"""GPU side of kvtierd: CUDA detection, host pinning, run-time compiled copy
kernels, the worker's paged-KV copy path and CUDA IPC of the HBM pool.

Importing this package imports neither torch nor cupy: every module here
imports them inside functions, so a CPU-only daemon never pays for them.
"""
