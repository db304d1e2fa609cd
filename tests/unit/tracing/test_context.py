"""W3C trace context: what is continued, what starts a new trace, what LiteLLM gets."""

from __future__ import annotations

import pytest

from mpcapi.tracing.context import parse_traceparent, trace_context

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_continued() -> None:
    context = trace_context(f"00-{TRACE}-{PARENT}-01", "vendor=abc,other=1")
    assert context.trace_id_hex == TRACE
    assert context.parent_span_id == int(PARENT, 16)
    assert context.sampled
    assert context.tracestate == "vendor=abc,other=1"
    assert context.span_id not in (0, context.upstream_span_id, context.parent_span_id)


def test_litellm_gets_our_call_as_its_parent() -> None:
    context = trace_context(f"00-{TRACE}-{PARENT}-01".encode())
    header = context.upstream_traceparent().decode()
    assert header == f"00-{TRACE}-{context.upstream_span_id:016x}-01"


def test_an_unsampled_parent_stays_unsampled() -> None:
    context = trace_context(f"00-{TRACE}-{PARENT}-00")
    assert not context.sampled
    assert context.upstream_traceparent().endswith(b"-00")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE}-{PARENT}",  # no flags
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # the forbidden version
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper case
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has nothing more
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(header: str | None) -> None:
    assert parse_traceparent(header) is None
    context = trace_context(header, "vendor=abc")
    assert context.parent_span_id is None
    assert context.tracestate is None  # tracestate means nothing without its traceparent
    assert context.sampled and context.trace_id and context.trace_id_hex != TRACE


def test_a_later_version_may_carry_more() -> None:
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-01-more") == (
        int(TRACE, 16),
        int(PARENT, 16),
        True,
    )


def test_new_traces_differ() -> None:
    assert len({trace_context(None).trace_id for _ in range(100)}) == 100
