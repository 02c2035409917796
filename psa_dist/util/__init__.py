"""Infrastructure that knows nothing of the method: atomic writes, progress lines, run records,
precision (autocast, and the CPU's bf16 timed and cached), and all of ``torch.distributed``.

Layer 1: imports ``core`` (``precision`` takes the CPU's tag and the cache directory from
``core.native``) and nothing else of the project outside ``util``.
"""
