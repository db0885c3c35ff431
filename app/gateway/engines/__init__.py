"""Engines: who answers, under which policy (limits.py and scheduler.py: issue 20, per-client
limits and fair scheduling; stats.py: what each API query cost)."""
