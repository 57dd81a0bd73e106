"""``make demo`` (``python -m demo``): the whole distillation stack end to end on one machine.

__main__ is the flow; common (paths, messages), prepare (teacher and data), stack (the
supervisord stack and its ports) and report (generation, summary) are its parts.
"""
