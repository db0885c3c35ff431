"""Fault-injection suite (pytest -m faults): real gateway process, controllable fake dependencies."""
