"""Many simultaneous clients through one daemon."""

from __future__ import annotations

import asyncio

import openai

from .harness import MOCK_TEXT, Daemon

CLIENTS = 200


async def _chat_many(api_base: str, count: int) -> list[str | None]:
    async with openai.AsyncOpenAI(
        base_url=api_base, api_key="unused", max_retries=0, timeout=120
    ) as client:
        completions = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"Hello {n}"}]
                )
                for n in range(count)
            )
        )
    return [completion.choices[0].message.content for completion in completions]


def test_200_concurrent_chat_completions(mpcapi: Daemon) -> None:
    answers = asyncio.run(asyncio.wait_for(_chat_many(mpcapi.api_base, CLIENTS), timeout=180))
    assert answers == [MOCK_TEXT] * CLIENTS
