"""Triton kernels, installed as cacheaug_engine.triton_kernels (one file per op family)."""
