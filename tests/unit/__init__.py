"""Unit tests of the library layer (no Celery, no services)."""
