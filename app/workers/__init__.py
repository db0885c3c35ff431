"""Celery workers: background collection from vROps into Redis (see docs/vrops.md)."""
