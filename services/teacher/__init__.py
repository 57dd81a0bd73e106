"""The teacher service: one process per teacher group (see __main__.py)."""
