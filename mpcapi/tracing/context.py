"""W3C trace context (``traceparent``, ``tracestate``) of one call: continued from the client
when it sent a valid one, else a new trace; what goes on to LiteLLM. No OpenTelemetry here:
this is what the request path touches, and it must stay cheap."""

from __future__ import annotations

import random
import re

import attrs

# version-traceid-parentid-flags (https://www.w3.org/TR/trace-context/#traceparent-header)
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_MAX_TRACESTATE = 512  # the spec's minimum a vendor must propagate

# Seeded from os.urandom when the module loads (each worker is its own process).
_random_bits = random.Random().getrandbits


def _nonzero(bits: int) -> int:
    while True:
        value = _random_bits(bits)
        if value:
            return value


@attrs.frozen
class TraceContext:
    """The ids of one call's two spans: ``span_id`` (MPC-API serving it) and
    ``upstream_span_id`` (its LiteLLM call, the parent LiteLLM sees), in ``trace_id``."""

    trace_id: int
    span_id: int
    upstream_span_id: int
    parent_span_id: int | None = None  # the client's span, when it sent a traceparent
    sampled: bool = True
    tracestate: str | None = None

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def upstream_traceparent(self) -> bytes:
        """The ``traceparent`` LiteLLM gets: our LiteLLM call as its parent."""
        flags = "01" if self.sampled else "00"
        return f"00-{self.trace_id:032x}-{self.upstream_span_id:016x}-{flags}".encode("ascii")


def parse_traceparent(value: str | bytes | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``; None otherwise."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    match = _TRACEPARENT.match(text.strip())
    if match is None:
        return None
    version, trace_hex, parent_hex, flags_hex, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, parent_id = int(trace_hex, 16), int(parent_hex, 16)
    if not trace_id or not parent_id:
        return None
    return trace_id, parent_id, bool(int(flags_hex, 16) & 1)


def trace_context(
    traceparent: str | bytes | None, tracestate: str | bytes | None = None
) -> TraceContext:
    """The context of a call that arrived with these headers (either may be missing)."""
    parent = parse_traceparent(traceparent)
    if parent is None:
        return TraceContext(_nonzero(128), _nonzero(64), _nonzero(64))
    trace_id, parent_id, sampled = parent
    state = tracestate.decode("latin-1") if isinstance(tracestate, bytes) else tracestate
    if state is not None:
        state = state.strip()[:_MAX_TRACESTATE] or None
    return TraceContext(trace_id, _nonzero(64), _nonzero(64), parent_id, sampled, state)


__all__ = ["TraceContext", "parse_traceparent", "trace_context"]
