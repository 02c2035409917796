"""The networks: backbones, the classifier / AffinityNet / segmenters, their optimiser and
checkpoint files.

Layer 2: imports ``core``, ``util`` and ``config``; not ``data`` or ``cluster`` (siblings).
"""
