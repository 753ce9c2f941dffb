"""Celery workers: the app, its tasks, and the supervisor of training runs. Never imports torch."""
