"""The label convention every part shares: the data preparation writes it, the loader pads with
it, the losses read it. Plain Python (no torch), so the tokenisation workers can import it."""

IGNORE = -100
"""Label of a position that is not trained (prompt, padding, a document's last token)."""

LABEL_CONVENTION = (
    "shifted next-token targets: labels[t] is the token to predict at position t "
    f"(= input_ids[t+1] inside a document) or {IGNORE} where not trained; the last position of a "
    f"document is {IGNORE}, the last position of a truncated/split piece keeps its real next token")
"""How labels line up with input_ids; written into every dataset card."""
