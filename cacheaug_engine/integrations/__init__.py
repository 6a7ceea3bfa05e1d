"""Adapters to other libraries (transformers, lm-evaluation-harness, vLLM). Each is optional: its
module imports its library and is never imported by the core."""
