"""Configuration: every setting, its sources and its checks."""
