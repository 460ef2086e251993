"""The README's grpcurl example speaks the real API.

grpcurl itself is not installable here, so the example is checked where it can go wrong:
its request body must parse as a StreamCompleteRequest in proto3 JSON (field and enum
names), and every response line it shows must parse as a StreamCompleteResponse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from google.protobuf import json_format

from modelbroker.v1 import broker_pb2 as pb

README = Path(__file__).resolve().parents[1] / "README.md"


def _grpcurl_block() -> str:
    text = README.read_text()
    start = text.index("## Calling it from any language")
    section = text[start : text.index("\n## ", start + 1)]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        if "ModelBroker/StreamComplete" in block and "grpcurl" in block:
            return str(block)
    raise AssertionError("no grpcurl StreamComplete example in 'Calling it from any language'")


def _shown_responses(block: str) -> list[str]:
    """The commented JSON lines after the command; a message may wrap onto `#` lines."""
    objects: list[str] = []
    current = ""
    for line in block.splitlines():
        body = line.removeprefix("#").strip()
        if not line.startswith("#") or (not current and not body.startswith("{")):
            continue
        current += body
        if current.count("{") == current.count("}"):
            objects.append(current)
            current = ""
    return objects


def test_request_body_is_a_stream_complete_request() -> None:
    block = _grpcurl_block()
    match = re.search(r"-d '(\{.*?\})'", block, re.S)
    assert match is not None, block
    req = json_format.Parse(match.group(1), pb.StreamCompleteRequest())
    assert req.model == "openai/gpt-4o-mini"
    assert [m.role for m in req.messages] == [pb.ROLE_USER]
    assert req.messages[0].content[0].text == "Say hello in French"


def test_shown_output_is_a_valid_stream() -> None:
    shown = _shown_responses(_grpcurl_block())
    msgs = [json_format.Parse(s, pb.StreamCompleteResponse()) for s in shown]
    kinds = [m.WhichOneof("event") for m in msgs]
    assert kinds[0] == "start" and kinds[-1] == "end" and "text_delta" in kinds, kinds
    end = msgs[-1].end
    assert end.finish_reason == pb.FINISH_REASON_STOP
    assert end.cost.known and end.cost.total_micro_usd == end.cost.input_micro_usd + end.cost.output_micro_usd
    # proto3 JSON writes int64 as strings: what a caller reading grpcurl output must expect.
    assert json.loads(shown[-1])["end"]["usage"]["inputTokens"] == str(end.usage.input_tokens)
