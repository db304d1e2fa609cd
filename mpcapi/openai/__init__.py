"""The OpenAI wire format: request schemas and validation, SSE framing, usage, OpenAPI."""
