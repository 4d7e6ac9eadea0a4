"""celery-persist benchmarks: hub vs raw floor per store, and a real-worker Celery benchmark.

Run ``python -m benchmarks --help``; results and how to read them are in benchmarks/README.md.
"""
