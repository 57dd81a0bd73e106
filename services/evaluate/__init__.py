"""Evaluate exported students against their teacher (``python -m services.evaluate``).

``scores`` owns the maths (perplexity, KL, top-1 agreement), ``heldout`` reads the held-out
sets, ``models`` loads and checks the models, ``generation`` makes greedy outputs side by side,
``decode`` measures decode speed and memory, ``report`` renders the Markdown.
"""
