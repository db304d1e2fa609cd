"""A small client of MPC-API's WebSocket endpoint: streams one or more chat completions at once.

    pip install websockets
    python examples/ws_client.py "Say hello"
    python examples/ws_client.py --url ws://localhost:3000/api/ws "Hi" "Tell me a joke"
    python examples/ws_client.py --cancel-after 3 "Write a long story"

Every prompt is one request with its own id, all in flight on one socket. With one prompt the
text is printed as it arrives; with several, each answer is printed when it is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from websockets.sync.client import connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--url", default="ws://localhost:3000/api/ws")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--key", help="sent as 'Authorization: Bearer KEY' (if MPC-API has none)")
    parser.add_argument("--cancel-after", type=int, metavar="N", help="cancel after N chunks")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per message")
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else None
    texts: dict[str, list[str]] = {str(n): [] for n in range(1, len(args.prompts) + 1)}
    chunks = dict.fromkeys(texts, 0)
    streaming = len(args.prompts) == 1
    failed = False

    with connect(args.url, additional_headers=headers, open_timeout=args.timeout) as socket:
        for request_id, prompt in zip(texts, args.prompts, strict=True):
            body = {"model": args.model, "messages": [{"role": "user", "content": prompt}]}
            socket.send(json.dumps({"id": request_id, "type": "chat.completions", "body": body}))
        pending = set(texts)
        while pending:
            message: dict[str, Any] = json.loads(socket.recv(timeout=args.timeout))
            request_id, kind = message.get("id"), message["type"]
            if kind == "chunk":
                for choice in message["data"].get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    texts[request_id].append(piece)
                    if streaming:
                        print(piece, end="", flush=True)
                chunks[request_id] += 1
                if args.cancel_after is not None and chunks[request_id] == args.cancel_after:
                    socket.send(json.dumps({"id": request_id, "type": "cancel"}))
                continue
            if kind == "error":
                failed = True
                print(
                    f"\n[{request_id}] error {message['status']} {message['error']}: "
                    f"{message['message']}",
                    file=sys.stderr,
                )
            elif not streaming:
                print(f"[{request_id}] {''.join(texts[request_id])}")
            if kind == "cancelled":
                print(f"\n[{request_id}] cancelled", file=sys.stderr)
            pending.discard(request_id)  # an error without an id ends nothing of ours
    if streaming and not failed:
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
