"""Unit tests of mpcapi.metrics (metrics and dashboard)."""
