"""The benchmark suites, kept in the source tree (the wheel does not carry them). Run them from
the repository root as modules, e.g. ``python -m benchmarks.bench_ops --quick`` (``make bench``),
``python -m benchmarks.bench_tables``, ``python -m benchmarks.bench_training``; the other files
here are scripts (``python benchmarks/bench_quick.py``)."""
