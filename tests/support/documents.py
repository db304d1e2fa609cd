"""Hypothesis strategies of request bodies: any JSON, near-valid chat requests, raw bytes,
deep nesting and huge numbers."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.support.gateway import CHAT

huge_integers = st.integers(min_value=-(10**4000), max_value=10**4000)
json_scalars = st.none() | st.booleans() | huge_integers | st.floats() | st.text(max_size=200)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=30,
)


@st.composite
def near_valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A valid chat request with some fields replaced, removed or added at random."""
    document: dict[str, Any] = json.loads(json.dumps(CHAT))
    fields = [
        "model",
        "messages",
        "temperature",
        "top_p",
        "n",
        "max_tokens",
        "stream",
        "stop",
        "prompt",
        "input",
        "encoding_format",
        "dimensions",
        "tools",
        "user",
    ]
    for field in draw(st.lists(st.sampled_from(fields), max_size=4)):
        if draw(st.booleans()):
            document[field] = draw(json_values)
        else:
            document.pop(field, None)
    if draw(st.booleans()):
        document["messages"] = [{"role": draw(st.text(max_size=10)), "content": draw(json_values)}]
    return document


def deep_nesting(depth: int, kind: str) -> bytes:
    opening, closing = {"array": (b"[", b"]"), "object": (b'{"a":', b"}")}[kind]
    return opening * depth + b"1" + closing * depth


bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    near_valid_documents().map(lambda document: json.dumps(document).encode()),
    st.binary(max_size=2000),
    st.builds(
        deep_nesting,
        st.integers(min_value=1, max_value=200_000),
        st.sampled_from(["array", "object"]),
    ),
    st.text(max_size=500).map(lambda text: text.encode("utf-8", "surrogatepass")),
    huge_integers.map(lambda number: b'{"model": "m", "n": %d}' % number),
    st.just(b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": NaN}'),
)
