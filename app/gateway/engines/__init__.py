"""Who answers under which policy: may import caching, upstream, promql, catalog, result, settings, metrics."""
