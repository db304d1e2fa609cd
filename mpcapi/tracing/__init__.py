"""OpenTelemetry traces and metrics of API calls (off unless an OTLP endpoint is set)."""
