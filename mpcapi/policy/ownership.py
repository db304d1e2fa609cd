"""Ownership of what LiteLLM stores for clients: responses, files, batches.

MPC-API calls LiteLLM with one key for every client, so LiteLLM cannot tell clients apart;
MPC-API does. The key that created an object owns it; anyone else who reads, lists,
cancels, deletes or refers to it (``previous_response_id``, a batch's ``input_file_id``)
is told it does not exist (404), as if it never had. Owners are recorded in the client
keys' database (``storage.objects``), so every instance on it agrees; an owner, once
known, is remembered in memory (it never changes).

LiteLLM hands out ids of its own that encode the provider's id with the deployment that
holds it, and not always the same one for the same object (a response's id is encoded
anew on every answer; a file list shows the provider's ids). Owners are therefore kept by
the provider's id inside (``provider_id``). A forged id gains nothing: it names a provider
id whose owner is someone else, or nobody.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

import attrs

from mpcapi.errors import ApiError
from mpcapi.storage import objects
from mpcapi.storage.database import Database

_REMEMBERED = 10_000  # owners kept in memory


def provider_id(object_id: str) -> str:
    """The provider's id inside one of LiteLLM's ids (``object_id`` itself otherwise):
    ``resp_`` + base64 of ``litellm:custom_llm_provider:…;model_id:…;response_id:<id>``, or
    ``file-``/``batch_`` + URL-safe base64 of ``litellm:<id>;model,<model>``."""
    for prefix, decode in (
        ("resp_", base64.b64decode),
        ("file-", base64.urlsafe_b64decode),
        ("batch_", base64.urlsafe_b64decode),
    ):
        if object_id.startswith(prefix):
            encoded = object_id[len(prefix) :]
            try:
                text = decode(encoded + "=" * (-len(encoded) % 4)).decode("utf-8")
            except (binascii.Error, ValueError):
                return object_id
            if text.startswith("litellm:custom_llm_provider:") and ";response_id:" in text:
                return text.rpartition(";response_id:")[2]
            if text.startswith("litellm:") and ";model," in text:
                return text[len("litellm:") :].rpartition(";model,")[0]
            return object_id
    return object_id


def not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, "Not Found", f"no {kind} with id {object_id!r}", code=f"{kind}_not_found")


@attrs.define
class Ownership:
    """Records and checks who made each stored object."""

    database: Database
    _owners: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)

    async def claim(self, kind: str, object_id: str, owner: str) -> None:
        stored_id = provider_id(object_id)
        if self._owners.get((kind, stored_id)) == owner:
            return  # recorded already
        stored_owner = await self.database.run(objects.claim, kind, stored_id, owner)
        self._remember(kind, stored_id, stored_owner)

    async def check(self, kind: str, object_id: str, owner: str) -> None:
        """404 unless ``owner`` made the object."""
        stored_id = provider_id(object_id)
        known = self._owners.get((kind, stored_id))
        if known is None:
            known = await self.database.run(objects.owner_of, kind, stored_id)
            if known is not None:
                self._remember(kind, stored_id, known)
        if known != owner:
            raise not_found(kind, object_id)

    async def only_owned(self, kind: str, listing: Any, owner: str) -> Any:
        """A list answer (``{"data": [{"id": …}, …]}``) cut to ``owner``'s objects."""
        items = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(items, list):
            return listing
        ids = {
            item["id"]: provider_id(item["id"])
            for item in items
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        }
        stored: Sequence[str] = sorted(set(ids.values()))
        owned = await self.database.run(objects.owned_among, kind, stored, owner)
        kept = [
            item
            for item in items
            if isinstance(item, dict) and ids.get(item.get("id", "")) in owned
        ]
        cut = {**listing, "data": kept}
        if "first_id" in cut:  # OpenAI's cursor fields describe the list as shown
            cut["first_id"] = kept[0]["id"] if kept else None
            cut["last_id"] = kept[-1]["id"] if kept else None
        return cut

    def _remember(self, kind: str, object_id: str, owner: str) -> None:
        if len(self._owners) >= _REMEMBERED:
            self._owners.pop(next(iter(self._owners)))
        self._owners[(kind, object_id)] = owner


__all__ = ["Ownership", "not_found", "provider_id"]
