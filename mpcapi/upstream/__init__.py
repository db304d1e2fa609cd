"""The LiteLLM side: the treq client, its bodies and the balancer over several instances."""
