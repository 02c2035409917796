"""One module per model kind (``classifier``, ``affinity_net``, ``segmenter``): how it is built,
where its weights start, its loss and targets, its held-out set, its TensorBoard panels and what
the benchmarks time of it. The stage table's model rows name these modules; nothing else branches
on a model's name.
"""
