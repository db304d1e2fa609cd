"""Unit tests of mpcapi.openai (the wire format)."""
