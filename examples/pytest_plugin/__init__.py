"""Testing an approval flow with celery-persist's pytest plugin: see README.md here."""
