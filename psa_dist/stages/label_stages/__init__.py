"""One module per label stage (``cams``, ``aff_labels``, ``random_walk``): its shard function
(decode, the core's tensor functions, encode, one output shard written atomically), how its
worker calls it under the config, what ``psa-dist export`` writes of it, and what ``bench cost``
says of it. ``base`` holds the reading and writing they share. The stage table's rows name these
modules; the label workers, export and the benchmarks call them and branch on no stage name.
"""
