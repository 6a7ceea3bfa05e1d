"""Adapters to other libraries (transformers, lm-evaluation-harness, vLLM). Each is optional: its
module imports its library and is never imported by the core.

* ``integrations.transformers``: the augmented cache out to the user's own ``model.generate``;
* ``integrations.transformers_trainer``: the objective under ``transformers.Trainer`` / ``accelerate``.
"""
