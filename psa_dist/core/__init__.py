"""The method as pure tensor functions: affinity labels and loss, the random walk, CAMs, pseudo
labels, the dense CRF, metrics, and the C kernels behind them. No I/O, no distribution.

Layer 0: imports nothing of the project outside ``core``.
"""
