"""Developer tools: the benchmark (``python -m tools.bench``) and the monitoring jobs' scale
benchmark (``python -m tools.scale_bench``). Not part of the served package or the Bento."""
