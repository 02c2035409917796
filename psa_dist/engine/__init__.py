"""The training loop every trainer runs: the step and the epoch (``loop``), and what happens around
them as hooks (``hooks``: the loss log and its finite checks, checkpoints, the stopping rules,
TensorBoard), assembled by ``trainer.train``. It takes a loss callable and a loader and knows no
stage or model kind (``stages/`` gives it those). Layer 3: imports ``core``, ``util``, ``config``
and ``nets``.
"""
