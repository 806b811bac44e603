"""Seed conventions every command shares.

Demonstrations (``collect``) use episode seeds from 0 upwards; every evaluation (``eval``,
in-training evaluation, RL evaluation, the demo, the sim bridge's parameter files) starts
at :data:`EVAL_SEED`, so no evaluation episode was seen in training and every stage's
success rate is measured on the same episodes.
"""

EVAL_SEED = 100_000
