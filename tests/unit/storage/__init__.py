"""Unit tests of mpcapi.storage (databases and Redis)."""
