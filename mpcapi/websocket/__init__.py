"""The WebSocket endpoint: several streamed requests on one socket."""
