"""MPC-API: an OpenAI-compatible gateway in front of LiteLLM."""

__version__ = "0.1.0"
