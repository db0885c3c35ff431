"""vROps collection: background Celery workers fill Redis, the API serves Prometheus text."""
