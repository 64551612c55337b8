"""Pruning: the mechanism every method shares, and the methods.

Mechanism: `layers` (which modules are conv-like), `gates` (parametrizations on weights; bake to plain layers),
`coupling` (channel groups of any traced net), `slicing` (keep masks -> compact net), `budget` (what a compact
net costs), `base` (the `Pruner` contract the training loop knows). Methods: `methods.METHODS`.
"""
