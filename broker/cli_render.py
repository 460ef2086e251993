"""What the CLI's client commands print: proto messages as plain JSON, and a completion
stream as text (the answer on stdout, a summary line on stderr) or as JSON lines.

`plain` walks the message descriptors rather than listing fields by hand, so a field added
to the proto shows up in every `--json` output without a change here. It differs from
proto3 JSON (json_format) where that is awkward on a command line: int64 values are numbers,
not strings, and enum values are short lowercase names (`FINISH_REASON_STOP` -> `stop`).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from broker.cli_features import ReasoningPrinter
from modelbroker.v1 import broker_pb2 as pb

_ENUM_PREFIXES: dict[str, str] = {}


def enum_name(enum: Any, number: int) -> str:
    """`FINISH_REASON_STOP` -> `stop` (buf's STANDARD rules prefix every value with its enum's name)."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)  # a value newer than these stubs
    prefix = _ENUM_PREFIXES.get(enum.full_name)
    if prefix is None:
        prefix = _ENUM_PREFIXES[enum.full_name] = (
            "".join(("_" + c if c.isupper() and i else c) for i, c in enumerate(enum.name)).upper() + "_"
        )
    return str(value.name).removeprefix(prefix).lower()


def _value(fd: Any, value: Any) -> Any:
    # `fd` is a FieldDescriptor (upb's at run time, which the stubs type apart from the Python one).
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        if fd.message_type.full_name.startswith("google.protobuf."):
            return json_format.MessageToDict(value)  # Timestamp -> RFC 3339, Struct -> object
        return plain(value)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return enum_name(fd.enum_type, value)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        import base64

        return base64.b64encode(value).decode()
    return value


def plain(msg: Message) -> dict[str, Any]:
    """A message as a dict of its fields: scalars always (zero values included), message
    fields and oneof members only when set, maps as objects."""
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        if fd.containing_oneof is not None and msg.WhichOneof(fd.containing_oneof.name) != fd.name:
            continue
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: _value(vfd, v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_value(fd, v) for v in value]
        elif fd.has_presence and not msg.HasField(fd.name):
            continue
        else:
            out[fd.name] = _value(fd, value)
    return out


def dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False)


def error_doc(err: Any) -> dict[str, Any]:
    """A BrokerError as the `{"event": "error", ...}` line of `complete --json`."""
    doc: dict[str, Any] = {"event": "error", "code": err.code.name, "message": err.message}
    if err.reason:
        doc["reason"] = err.reason
    if err.metadata:
        doc["metadata"] = err.metadata
    if err.field_violations:
        doc["field_violations"] = [{"field": f, "description": d} for f, d in err.field_violations]
    if err.retry_delay is not None:
        doc["retry_delay_seconds"] = err.retry_delay
    return doc


def price(cost: pb.Cost) -> str:
    if not cost.known:
        return "unknown"
    return f"${cost.total_micro_usd / 1e6:.6f} ({cost.total_micro_usd} micro-USD)"


def summary(provider: str, model: str, finish: str, usage: pb.Usage, cost: pb.Cost) -> str:
    """The stderr line after an answer: who answered, why it stopped, tokens and cost."""
    estimated = " (estimated: the upstream reported no usage)" if usage.estimated else ""
    return (
        f"[{provider}/{model}] finish={finish} tokens in={usage.input_tokens} out={usage.output_tokens} "
        f"cached={usage.cached_input_tokens}{estimated} cost={price(cost)}"
    )


class StreamPrinter:
    """One StreamComplete's messages as a person reads them: text as it arrives, tool calls
    as `[tool call ID] name(arguments)`, and the summary line on stderr at the end.
    `text` accumulates the answer (the chat history needs it)."""

    def __init__(
        self, out: TextIO | None = None, err: TextIO | None = None, *, hide_reasoning: bool = False
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        # Reasoning goes to stderr (dimmed on a terminal): `> answer.txt` keeps only the answer.
        self.reasoning = ReasoningPrinter(self.err, hide=hide_reasoning)
        self.start = pb.StreamStart()
        self.text = ""
        self._in_call = False  # a tool call's "(" is open
        self._wrote = False  # anything written: a tool call after text starts a new line

    def event(self, msg: pb.StreamCompleteResponse) -> None:
        kind = msg.WhichOneof("event")
        if kind == "reasoning_delta":
            self.reasoning.delta(msg.reasoning_delta)
            return
        self.reasoning.close()
        if kind == "start":
            self.start = msg.start
        elif kind == "text_delta":
            self.out.write(msg.text_delta.text)
            self.out.flush()
            self.text += msg.text_delta.text
            self._wrote = self._wrote or bool(msg.text_delta.text)
        elif kind == "tool_call_delta":
            d = msg.tool_call_delta
            if d.name:
                self.out.write(f"{')' if self._in_call else ''}{chr(10) if self._wrote else ''}")
                self.out.write(f"[tool call {d.id}] {d.name}(")
                self._in_call = self._wrote = True
            self.out.write(d.arguments_delta)
            self.out.flush()
        elif kind == "end":
            self.out.write(")\n" if self._in_call else "\n")
            self.out.flush()
            e = msg.end
            finish = enum_name(pb.FinishReason.DESCRIPTOR, e.finish_reason)
            if e.HasField("refusal"):
                print(refusal_line(e.refusal), file=self.err)
            print(summary(self.start.provider, self.start.model, finish, e.usage, e.cost), file=self.err)
        # Other events (any added later) are not part of the printed answer.

    def interrupted(self) -> None:
        """The stream failed part-way: end the partial line so the error starts on its own."""
        if self._wrote:
            self.out.write(")\n" if self._in_call else "\n")
            self.out.flush()


class JsonLinesPrinter:
    """One StreamComplete's messages as JSON lines: `{"event": "<oneof name>", ...fields}`,
    and `{"event": "error", ...}` last when the stream fails."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.text = ""

    def event(self, msg: pb.StreamCompleteResponse) -> None:
        kind = msg.WhichOneof("event")
        if kind is None:
            return  # an event newer than these stubs
        if kind == "text_delta":
            self.text += msg.text_delta.text
        self.out.write(dumps({"event": kind, **plain(getattr(msg, kind))}) + "\n")
        self.out.flush()

    def failed(self, err: Any) -> None:
        self.out.write(dumps(error_doc(err)) + "\n")
        self.out.flush()


def refusal_line(r: pb.Refusal) -> str:
    category = f" ({r.category})" if r.category else ""
    return f"refused{category}: {r.explanation or 'no explanation given'}"


def print_answer(
    resp: pb.CompleteResponse,
    out: TextIO | None = None,
    err: TextIO | None = None,
    *,
    hide_reasoning: bool = False,
) -> None:
    """A unary Complete answer as text (+ tool calls) on stdout, reasoning and the summary on stderr."""
    out, err = out or sys.stdout, err or sys.stderr
    thinking = ReasoningPrinter(err, hide=hide_reasoning)
    for i, p in enumerate(resp.message.content):
        if p.WhichOneof("part") == "reasoning":
            r = p.reasoning
            thinking.delta(pb.ReasoningDelta(index=i, text=r.text, redacted_data=r.redacted_data))
    thinking.close()
    if resp.HasField("refusal"):
        print(refusal_line(resp.refusal), file=err)
    out.write("".join(p.text for p in resp.message.content if p.WhichOneof("part") == "text"))
    for tc in resp.message.tool_calls:
        out.write(f"\n[tool call {tc.id}] {tc.name}({tc.arguments})")
    out.write("\n")
    finish = enum_name(pb.FinishReason.DESCRIPTOR, resp.finish_reason)
    print(summary(resp.provider, resp.model, finish, resp.usage, resp.cost), file=err)
