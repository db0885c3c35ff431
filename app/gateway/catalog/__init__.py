"""The figure catalog as data and its figure names: may import promql only."""
