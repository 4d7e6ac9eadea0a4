"""A payment released on 2-of-3 signatures, collected by a task that waits for each signer.

Run it: ``python -m examples.multisig``; the task is in :mod:`examples.multisig.app`.
"""
