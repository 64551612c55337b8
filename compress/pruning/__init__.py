"""Pruning: one gate mechanism (`gates`) and the pruners that drive it (`magnitude`, `iks`)."""
