"""Unit tests of mpcapi.policy (keys, limits, cache)."""
