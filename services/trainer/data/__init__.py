"""Data preparation (``python -m services.trainer.data``) and the trainer-side loader.

Kept import-light on purpose: tokenisation workers are spawned and import this package, so
nothing here may pull in torch or transformers models.
"""
