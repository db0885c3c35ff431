"""The HTTP edge, parse and pick.

May import service, engines, upstream (answers), render, result, catalog, promql, settings.
"""
