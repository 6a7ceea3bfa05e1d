"""Benchmarks, installed as cacheaug_engine.bench; results/ holds committed JSON."""
