"""Unit tests of mpcapi.runtime (the running daemon)."""
