"""Load benchmarks for depot-node. Run ``uv run python bench/ingest.py --help``."""
