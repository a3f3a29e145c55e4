"""Helpers of ``benchmarks/run.py``, reusable by the ``bench_<op>.py`` scripts.

Timing lives in the package, ``fastvit._timing`` (time_calls: warm-up until stable, CUDA-event median
over rotated input buffers; peak_memory_gib; median_ms and the ceilings), shared with
``python -m fastvit.selftest``. Here: rows.py (the table rows), providers.py (timm / fastvit ways to run a model),
measure.py (the metrics of one cell), report.py (environment, JSON / CSV / markdown, --compare,
the chart), opbench.py (the runner every ``bench_<op>.py`` declares its cases and providers on).
Scripts in benchmarks/ import it as ``_harness`` (their own folder is on sys.path).
"""
