"""Evaluation: sampling with fixed seeds, a feature space of our own, metrics and reports."""
