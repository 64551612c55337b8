"""Pruning: one mask mechanism (`masks.WeightMasks`) and the pruners that drive it."""
