"""Algorithm 1 over dialogues: chaining (``chain``), whole runs (``runner``), model-based evaluation.

Kept free of torch imports so that light commands can read ``DEFAULT_BETA`` and ``InferenceEvents``.
"""

DEFAULT_BETA = 0.6
"""The paper's JCM threshold (Figure 7): the default wherever a threshold is chosen for the user."""

DEFAULT_BATCH_SIZE = 64
"""Dialogues advancing together in ``infer``/``eval``: the best of 1, 4, 16, 64 measured on the tiny preset
on a 2-core CPU (docs/inference.md, "Batched dialogues"); at 7B the 64 KV caches take about 8 GB."""
