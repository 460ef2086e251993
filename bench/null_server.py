"""A gRPC server that does nothing: ModelBroker answered from memory, no upstream.

It is the floor under the broker (what grpc.aio in Python costs by itself on this machine;
the report gives the broker's unary throughput as a share of it) and the check on the gRPC
load generator: driven by the same generator, it shows how far that generator goes when
the server costs almost nothing. bench-think-R-N models stream R reasoning deltas first; bench-hold-N-MS ones pace their N
chunks MS apart, as bench.upstream does (held streams: what grpc.aio alone holds).

    python -m bench.null_server --port N      prints "PORT <n>" when it listens
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.upstream import chunk_texts, parse_model, reasoning_texts
from modelbroker.v1 import broker_pb2 as pb
from modelbroker.v1 import broker_pb2_grpc as pb_grpc


class NullBroker(pb_grpc.ModelBrokerServicer):
    async def Complete(self, request: pb.CompleteRequest, context: Any) -> pb.CompleteResponse:
        shape = parse_model(request.model)
        message = pb.Message(role=pb.ROLE_ASSISTANT)
        message.content.add(text="".join(chunk_texts(shape.chunks if shape else 1)))
        return pb.CompleteResponse(request_id="null", model=request.model, provider="null", message=message)

    async def StreamComplete(
        self, request: pb.StreamCompleteRequest, context: Any
    ) -> AsyncIterator[pb.StreamCompleteResponse]:
        shape = parse_model(request.model)
        msg = pb.StreamCompleteResponse
        yield msg(start=pb.StreamStart(request_id="null", model=request.model, provider="null"))
        for text in reasoning_texts(shape.reasoning if shape else 0):
            yield msg(reasoning_delta=pb.ReasoningDelta(text=text))
        for i, text in enumerate(chunk_texts(shape.chunks if shape else 1)):
            if i and shape and shape.gap:  # bench-hold-N-MS: held open, as the upstream paces it
                await asyncio.sleep(shape.gap)
            yield msg(text_delta=pb.TextDelta(text=text))
        yield msg(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_STOP))


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # The generated stubs mark every RPC abstract; the rest answer UNIMPLEMENTED, as grpc's base does.
    pb_grpc.add_ModelBrokerServicer_to_server(NullBroker(), server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
