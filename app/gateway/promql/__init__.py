"""The query language, no I/O (syntax, reach, Prometheus time): may import nothing of the gateway."""
