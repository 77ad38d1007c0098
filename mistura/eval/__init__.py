"""Scoring checkpoints: perplexity, bits per byte and tokens per word on any text (perplexity.py)."""
