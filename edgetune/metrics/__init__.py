"""Evaluation metrics: held-out loss and exact-match accuracy."""
