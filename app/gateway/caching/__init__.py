"""Stores and single flights, no policy.

May import upstream (answers, breaker), result, catalog, promql (timing), settings, metrics.
"""
