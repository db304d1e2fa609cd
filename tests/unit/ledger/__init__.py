"""Unit tests of mpcapi.ledger (the usage ledger)."""
