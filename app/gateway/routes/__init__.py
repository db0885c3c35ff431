"""The HTTP edge: parses and picks; may import service, engines, promql, catalog, render, result, settings, metrics."""
