"""Prometheus metrics and the live dashboard."""
