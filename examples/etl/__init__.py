"""A long ETL task that checkpoints after every batch and survives ``kill -9``.

Run it: ``python -m examples.etl``; the task is in :mod:`examples.etl.app`.
"""
