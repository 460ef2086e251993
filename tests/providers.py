"""What the provider tests (test_openai_provider, test_anthropic_provider, test_ollama_provider)
share: a started provider, and a stream read to its end or to its error."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from broker import errors
from broker.providers.base import Provider
from broker.types import CompletionEvent, CompletionRequest

P = TypeVar("P", bound=Provider)


@contextlib.asynccontextmanager
async def started(provider: P) -> AsyncIterator[P]:
    """`provider` started, and closed afterwards (the body of a `provider` fixture)."""
    await provider.start()
    yield provider
    await provider.close()


async def collect(provider: Provider, request: CompletionRequest) -> list[CompletionEvent]:
    return [e async for e in provider.stream(request)]


async def collect_until_error(
    provider: Provider, request: CompletionRequest
) -> tuple[list[CompletionEvent], errors.BrokerError]:
    """The events before the stream failed, and the BrokerError it failed with (it must fail)."""
    events: list[CompletionEvent] = []
    with pytest.raises(errors.BrokerError) as info:
        async for e in provider.stream(request):
            events.append(e)
    return events, info.value
