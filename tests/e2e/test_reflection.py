"""Server reflection as grpcurl uses it: list services, fetch descriptors, call without stubs.

Everything the caller knows comes from the reflection API (grpcio-reflection's client-side
descriptor database): no generated code for modelbroker.v1 is used to build the request or
read the answer. Auth is on, as in production: reflection itself needs no key, the call does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker.auth import hash_key
from tests.conftest import OPENAI_TEST_KEY, broker_settings
from tests.fakes.openai_upstream import FakeOpenAI

CALLER_KEY = "mb_test-reflection-7c1d2e3f4a5b6c7d"


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: list[str] = []
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    async for r in stub.ServerReflectionInfo(requests, timeout=10):
        names += [svc.name for svc in r.list_services_response.service]
    return names


def describe_and_call(target: str) -> dict[str, Any]:
    """What `grpcurl describe` and `grpcurl -d '{}' ... ListProviders` do, with a blocking channel."""
    with grpc.insecure_channel(target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("modelbroker.v1.ModelBroker")
        method = service.methods_by_name["ListProviders"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request_cls(), timeout=10, metadata=(("authorization", f"Bearer {CALLER_KEY}"),))
        return {
            "methods": sorted(m.name for m in service.methods),
            "streaming": {m.name for m in service.methods if m.server_streaming},
            "response": json_format.MessageToDict(response),
        }


async def test_reflection_lists_and_describes_and_the_service_can_be_called(daemon, channel_to) -> None:
    async with FakeOpenAI(api_key=OPENAI_TEST_KEY) as upstream:
        provider = {"name": "openai", "type": "openai", "base_url": upstream.url, "api_key": OPENAI_TEST_KEY}
        settings = broker_settings(
            [provider], auth={"keys": [{"name": "tools", "sha256": hash_key(CALLER_KEY)}]}
        )
        _, target = await daemon(settings)

        names = await list_services(channel_to(target))
        assert {"modelbroker.v1.ModelBroker", "grpc.health.v1.Health"} <= set(names)
        assert "grpc.reflection.v1alpha.ServerReflection" in names

        # The blocking client runs in a thread: the daemon serves on this event loop.
        found = await asyncio.to_thread(describe_and_call, target)
    assert found["methods"] == [
        "Complete",
        "Embed",
        "GetModel",
        "GetUsage",
        "ListModels",
        "ListProviders",
        "SelectModel",
        "StreamComplete",
    ]
    assert found["streaming"] == {"StreamComplete"}
    providers = found["response"]["providers"]
    assert [(p["name"], p["type"]) for p in providers] == [("openai", "openai")]
    assert providers[0]["baseUrl"] == upstream.url
