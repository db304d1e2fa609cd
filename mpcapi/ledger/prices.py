"""Prices and costs: USD per million tokens by model (``etc/prices.toml``), and what a
finished call cost and where that figure came from."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from mpcapi.exchange import Exchange


@attrs.frozen
class Price:
    """USD per 1,000,000 tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


class PriceTable:
    """Model name -> ``Price``; see etc/prices.toml for how names match."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)
        self._longest_first = sorted(self.prices, key=len, reverse=True)

    @classmethod
    def load(cls, path: str = "") -> PriceTable:
        """The table of ``path``, or the one shipped with MPC-API; ``ValueError`` says what is
        wrong with a file."""
        try:
            if path:
                with open(path, "rb") as handle:
                    document = tomllib.load(handle)
            else:
                text = resources.files("mpcapi").joinpath("data/prices.toml").read_text()
                document = tomllib.loads(text)
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}") from None
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path or 'prices.toml'} is not valid TOML: {error}") from None
        models = document.get("models")
        if not isinstance(models, dict):
            raise ValueError("the price table needs a [models] table")
        prices = {}
        for name, entry in models.items():
            try:
                price = Price(float(entry["input"]), float(entry["output"]))
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"model {name!r} needs numbers input and output") from None
            if price.input < 0 or price.output < 0:
                raise ValueError(f"model {name!r} has a negative price")
            prices[name] = price
        return cls(prices)

    def lookup(self, model: str | None) -> Price | None:
        if not model:
            return None
        for name in (model, model.rsplit("/", 1)[-1]):
            if name in self.prices:
                return self.prices[name]
            for known in self._longest_first:
                if name.startswith(known + "-"):
                    return self.prices[known]
        return None


def cost_of(exchange: Exchange, prices: PriceTable) -> tuple[float, str, int, int]:
    """A finished request's cost in USD, how it was obtained, and its prompt and completion
    tokens. Sources: ``litellm``, ``price_table``, ``unknown_model`` (cost 0), ``cache`` (a
    cache hit costs nothing), ``none`` (no usage: errors, refusals, models lists), and for a
    stream that ended before its usage chunk ``deltas_price_table`` /
    ``deltas_unknown_model`` (completion tokens = text chunks received)."""
    usage = exchange.usage
    prompt = usage.prompt_tokens if usage is not None else 0
    completion = usage.completion_tokens if usage is not None else 0
    if exchange.cache == "hit":
        return 0.0, "cache", prompt, completion
    if usage is not None and usage.cost_usd is not None:
        return usage.cost_usd, "litellm", prompt, completion
    prefix = ""
    if usage is None:
        deltas = exchange.content_deltas
        if not deltas:
            return 0.0, "none", 0, 0
        prefix, completion = "deltas_", deltas
    price = prices.lookup(exchange.model)
    if price is None:
        return 0.0, prefix + "unknown_model", prompt, completion
    return price.cost(prompt, completion), prefix + "price_table", prompt, completion
