"""Tiny random checkpoints in each release's folder layout, written on the spot, for the tests and the demo model's
initialisation (scripts/train_demo_model.py): loaded by exactly the code that loads real checkpoints.

Only tests and scripts import this package; the model code, the runners and the tools never do
(docs/architecture.md, "Layers").
"""
