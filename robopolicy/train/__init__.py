"""Behaviour cloning: trainer, checkpoints, sim evaluation."""
