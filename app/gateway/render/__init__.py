"""Renderers of QueryResult (JSON, text, docs): may import result, catalog, promql."""
