"""The pipeline's steps: the stage table and the modules its rows name (``label_stages/``: one
module per label stage; ``kinds/``: one per model kind), the run directory, the model factory, the
label workers, the trainers' rank entry point and launcher, evaluation, the report and the results
out of a run.

Layer 4: imports ``engine``, ``nets``, ``data``, ``cluster``, ``core``, ``util`` and ``config``.
"""
