"""Unit tests of mpcapi.config (configuration)."""
