"""Losses, optimizers and Trainer integration (EMO, Tiger, self-pretraining)."""
