"""Bridges to other sparsity tools (optional extras)."""
