"""What the tests share: one gateway builder over the composition root, one fake LiteLLM,
real Redis and database helpers, log capture, and ``free_port``."""
