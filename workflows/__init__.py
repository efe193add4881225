"""Small, deterministic training workflows that record one checkpoint per epoch."""
