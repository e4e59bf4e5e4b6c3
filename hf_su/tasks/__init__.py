"""Synthetic long-sequence tasks, generated from their definitions (nothing is downloaded)."""
