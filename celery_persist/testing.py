"""pytest plugin for testing flows built on celery-persist (entry point ``pytest11``).

Opt-in: nothing here runs until a test names one of its fixtures.
"""

from __future__ import annotations
