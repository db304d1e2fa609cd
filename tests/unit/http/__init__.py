"""Unit tests of mpcapi.http (the HTTP face)."""
