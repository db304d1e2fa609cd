"""Unit tests of mpcapi.upstream (the LiteLLM client)."""
