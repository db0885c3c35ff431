"""Stores and single flights, no policy: may import upstream (answers, breaker), catalog, result, settings, metrics."""
