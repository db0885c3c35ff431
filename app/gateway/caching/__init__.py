"""Stores and single flights (see docs/architecture.md); no policy here."""
