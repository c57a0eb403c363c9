"""Benchmarks of gnfx against first-order and published second-order optimizers.

`tasks` defines the training problems, `optimizers` the optimizers under test, `run` the
time-to-target benchmark (`python -m benchmarks.run --quick|--full`) and `overhead` the
per-step overhead micro-benchmark (`python -m benchmarks.overhead`).
"""
