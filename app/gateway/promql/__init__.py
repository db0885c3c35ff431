"""The query language, no I/O: syntax, reach, Prometheus time; imports nothing of the gateway."""
