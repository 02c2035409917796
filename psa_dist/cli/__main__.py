"""``python -m psa_dist.cli``: as the ``psa-dist`` command (torchrun and the benchmarks start it so)."""
import sys

from . import main

sys.exit(main())
