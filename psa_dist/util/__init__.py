"""Infrastructure that knows nothing of the method: atomic writes, progress lines, run records,
precision (autocast), and all of ``torch.distributed``.

Layer 1: imports nothing of the project outside ``util``.
"""
