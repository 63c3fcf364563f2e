"""Benchmarks of chain-of-lora against PEFT LoRA and full fine-tuning.

Each module is runnable as ``python -m benchmarks.<name>`` (speed, knot, memory, task, gpu),
writes its results as JSON (default ``benchmarks/results/<name>.json``, ``--output`` to
override) and prints a markdown table. Shared machinery (A/B timing, GEMM rate, model
builders, FLOP counting, tables, JSON) lives in :mod:`benchmarks.common`.

Timings on a shared CPU are noisy: every claim is a ratio of things measured in the same
process, as a median over alternated rounds.
"""
