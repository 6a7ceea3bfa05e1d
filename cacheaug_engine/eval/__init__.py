"""Evaluation: one evaluator (held-out per-position perplexity of the coprocessor against the decoder
alone and the controls), its tables and plots. ``cacheaug eval``, ``demo`` and ``train --eval-every``
all use ``evaluator``."""
