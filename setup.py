"""Packaging for MPC-API: `pip install .` gives the `mpcapi` twistd plugin."""

from setuptools import find_packages, setup

setup(
    name="mpcapi",
    version="0.1.0",
    description="OpenAI-compatible gateway in front of a LiteLLM proxy, on Twisted",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py (twistd finds plugins there), so it is named by hand.
    packages=[*find_packages(exclude=["tests*", "bench*"]), "twisted.plugins"],
    package_data={
        "mpcapi": ["py.typed", "data/prices.toml"],
        "mpcapi.openai": ["schemas/*.json"],
        "mpcapi.metrics.dashboard": ["static/*"],
    },
    install_requires=[
        "twisted>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "jsonschema>=4.18.0",
        "fastjsonschema>=2.19",
        "orjson>=3.9",
        "python-dotenv>=1.0.0",
        "attrs>=23.1.0",
        "autobahn>=24.4.2",
        "txredisapi>=1.6.0",  # Redis for shared rate limits and cache
        "psycopg[binary]>=3.1",  # PostgreSQL for client keys and usage (SQLite is built in)
        "prometheus_client>=0.20",  # /metrics, multiprocess mode with several workers
        # Traces and GenAI metrics over OTLP/HTTP (MPCAPI_OTEL_ENDPOINT); imported only when on
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp-proto-http>=1.27",
    ],
    entry_points={"console_scripts": ["mpcapi-admin = mpcapi.admin:main"]},
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-twisted>=1.14",
            "openai>=1.50",
            "anthropic>=0.40",  # the Messages tests of tests/integration/test_litellm_standin.py
            "langchain-openai>=0.3",  # the SDK error tests (tests/integration/test_sdk_errors.py)
            "opentelemetry-proto>=1.27",  # the OTLP receiver of the tracing tests
            "ruff>=0.6",
            "mypy>=1.11",
            "mypy-zope>=1.0",
            "types-jsonschema",
            "websockets>=13.0",
            "hypothesis>=6.100",  # property-based tests (tests/unit/test_properties.py)
            "schemathesis>=4.0",  # contract tests against /openapi.json
            "pyyaml>=6.0",  # checks of deploy/ and docker-compose.yml
            "playwright>=1.45",  # the dashboard test, with Debian's chromium
        ],
    },
)
