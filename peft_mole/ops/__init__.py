"""Compute kernels behind plain-torch reference implementations (models call these, never a backend)."""
