"""`psa-dist bench ...`: speed measured against a baseline in the same run, printed as ratios.

Layer 5 (beside ``pipeline``): imports ``stages`` and everything below it.
"""
