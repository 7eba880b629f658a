"""Evaluation: the character task folder through lm-eval against a served model, scores with CIs, parity, reports."""
