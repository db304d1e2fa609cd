"""Unit tests of mpcapi.websocket (the WebSocket endpoint)."""
