"""The pipeline's steps: the stage table, the run directory, the model factory, label generation
per shard, the training engine and its rank entry point, evaluation and the report.

Layer 4: imports ``engine``, ``nets``, ``data``, ``cluster``, ``core``, ``util`` and ``config``.
"""
