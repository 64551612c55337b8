"""compress: train SR networks and prune them (gradual magnitude today; IKS and FMP on the same mechanism)."""
