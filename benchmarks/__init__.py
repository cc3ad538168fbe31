"""The benchmark suite behind `make bench` (`python -m benchmarks`).

One module per benchmark (pretraining step, matmul rate, input pipeline, checkpoint I/O, probes); `suite`
runs them and `report` writes `bench-results/*.jsonl` plus a Markdown summary. Speed targets live here,
never in timed tests.
"""
