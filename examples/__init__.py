"""Runnable celery-persist examples: ``python -m examples.<name>`` from the repository root.

* ``approval``: an expense waits for a human; resumed over HTTP and with the CLI.
* ``etl``: a long task checkpoints each batch, its process is killed with
  SIGKILL, and the redelivered task finishes from its checkpoint.
* ``multisig``: a task collects 2-of-3 signatures; one signer never answers.
* ``agent``: an LLM-agent-style loop that waits for a tool result at every step.

Each starts its own worker subprocess and exits 0 once it checked what it
showed. With no environment it needs no server (kombu's filesystem broker,
Celery's file result backend, a SQLite store). Against real services, e.g.
those of ``docker/docker-compose.yml`` (whose ``worker`` runs
``examples.approval.app`` too, with the same keys)::

    export CELERY_BROKER_URL=redis://127.0.0.1:6379/0
    export CELERY_RESULT_BACKEND=redis://127.0.0.1:6379/1
    export CELERY_PERSIST_STORE_URL=postgresql://persist:persist@127.0.0.1:5432/persist
    export CELERY_PERSIST_KEYS=...            # the compose file's values
    export CELERY_PERSIST_SIGNING_SECRET=...
    python -m examples.approval

See :mod:`examples._embedded` for every variable.
"""
