"""Where work runs: submitit jobs (local or SLURM), a pool of Ray actors (or this process) over
shards, a Ray cluster inside a job, a chain of dependent SLURM jobs. Generic over the work: these
modules take callables and worker classes, and know nothing of stages or models.

Layer 2: imports ``util`` and ``config``; not ``nets`` or ``data`` (siblings).
"""
