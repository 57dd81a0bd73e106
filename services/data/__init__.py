"""Data preparation (``python -m services.data``), an offline job with its own workers.

Kept import-light on purpose: tokenisation workers are spawned and import this package, so
nothing here may pull in torch or transformers models.
"""
