"""Pieces of ``tools/bench_step.py`` (the entry point): model shapes, optimizer variants and byte
accounting, timing and memory probes, the run loop, the report and the docs page it writes."""
