"""The CLI's flags for the 2026 contract: `--reasoning`, `--json-schema`, `--document`,
`--hide-reasoning`, and how reasoning is shown (stderr, dimmed on a terminal, apart from the
answer on stdout, so `> answer.txt` keeps only the answer)."""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from pathlib import Path
from typing import IO, Any

from google.protobuf import struct_pb2

from modelbroker.v1 import broker_pb2 as pb

EFFORTS = {
    "minimal": pb.REASONING_EFFORT_MINIMAL,
    "low": pb.REASONING_EFFORT_LOW,
    "medium": pb.REASONING_EFFORT_MEDIUM,
    "high": pb.REASONING_EFFORT_HIGH,
}
MAX_SCHEMA_FILE_BYTES = 1 << 20
MAX_DOCUMENT_BYTES = 32 << 20  # Anthropic's request limit; the daemon bounds it again


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reasoning",
        metavar="EFFORT|BUDGET|off",
        type=reasoning_arg,
        help="ask for thinking: minimal, low, medium, high, a token budget (e.g. 2048), or off",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        type=schema_arg,
        help="answer as JSON matching the schema in FILE (strict; {name, schema} or a bare schema)",
    )
    p.add_argument(
        "--document",
        metavar="FILE",
        action="append",
        default=[],
        type=document_arg,
        help="attach a PDF or text file to the prompt (repeatable)",
    )
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the model's reasoning")


def reasoning_arg(value: str) -> pb.Reasoning:
    v = value.strip().lower()
    if v in ("off", "none", "disabled"):
        return pb.Reasoning(disabled=True)
    if v in EFFORTS:
        return pb.Reasoning(effort=EFFORTS[v])
    if v.isdigit() and int(v) > 0:
        return pb.Reasoning(budget_tokens=int(v))
    raise argparse.ArgumentTypeError(f"{value!r}: give minimal, low, medium, high, a token budget, or off")


def schema_arg(path: str) -> pb.JsonSchema:
    try:
        raw = Path(path).read_bytes()[: MAX_SCHEMA_FILE_BYTES + 1]
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
    if len(raw) > MAX_SCHEMA_FILE_BYTES:
        raise argparse.ArgumentTypeError(f"{path}: larger than {MAX_SCHEMA_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError(f"{path}: expected a JSON object (a schema, or {{name, schema}})")
    wrapped = isinstance(doc.get("schema"), dict)
    schema = doc["schema"] if wrapped else doc
    name = str(doc.get("name") or Path(path).stem.replace(".", "_"))[:64] if wrapped else Path(path).stem
    s = struct_pb2.Struct()
    s.update(schema)
    strict = doc.get("strict", True) if wrapped else True
    return pb.JsonSchema(
        name="".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "answer",
        schema=s,
        strict=bool(strict),
    )


def document_arg(path: str) -> pb.ContentPart:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise argparse.ArgumentTypeError(f"{path}: {size} bytes, over {MAX_DOCUMENT_BYTES}")
        data = p.read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
    media = "application/pdf" if data.startswith(b"%PDF-") else mimetypes.guess_type(p.name)[0] or ""
    if media != "application/pdf":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise argparse.ArgumentTypeError(f"{path}: neither a PDF nor UTF-8 text") from None
        media = "text/plain"
    return pb.ContentPart(document=pb.Document(data=data, media_type=media, title=p.name))


ROLE_NAMES = {
    "system": "ROLE_SYSTEM",
    "user": "ROLE_USER",
    "assistant": "ROLE_ASSISTANT",
    "tool": "ROLE_TOOL",
}
MAX_MESSAGES_FILE_BYTES = 64 << 20


def messages_arg(path: str) -> list[pb.Message]:
    """A JSON array of modelbroker.v1 Messages: proto JSON, or as `--no-stream --json` prints
    them (roles and enums by short name)."""
    from google.protobuf import json_format

    try:
        raw = Path(path).read_bytes()[: MAX_MESSAGES_FILE_BYTES + 1]
        doc = json.loads(raw)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, list) or not all(isinstance(m, dict) for m in doc):
        raise argparse.ArgumentTypeError(f"{path}: expected a JSON array of message objects")
    out: list[pb.Message] = []
    for i, m in enumerate(doc):
        role = str(m.get("role", ""))
        fixed = {**m, "role": ROLE_NAMES.get(role, role)}
        try:
            out.append(json_format.ParseDict(fixed, pb.Message()))
        except json_format.ParseError as exc:
            raise argparse.ArgumentTypeError(f"{path}: message [{i}]: {exc}") from None
    return out


def apply(args: argparse.Namespace, req: Any) -> None:
    """Set the flags' fields on a (Stream)CompleteRequest whose last message is the user's."""
    if getattr(args, "reasoning", None) is not None:
        req.params.reasoning.CopyFrom(args.reasoning)
    if getattr(args, "json_schema", None) is not None:
        req.params.json_schema.CopyFrom(args.json_schema)
    docs = getattr(args, "document", None) or []
    if docs:
        target = next((m for m in reversed(req.messages) if m.role == pb.ROLE_USER), None)
        if target is None:
            target = req.messages.add(role=pb.ROLE_USER)
        target.content.extend(docs)


class ReasoningPrinter:
    """Reasoning deltas to stderr, dimmed on a terminal, a newline before the answer resumes."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: IO[str] | None = None, *, hide: bool = False) -> None:
        self.out = out or sys.stderr
        self.hide = hide
        self.tty = self.out.isatty()
        self.open = False
        self.redacted = 0

    def delta(self, d: pb.ReasoningDelta) -> None:
        if self.hide:
            return
        if d.redacted_data:
            self.redacted += 1
        if not d.text:
            return
        if not self.open:
            self.out.write(f"{self.DIM}[reasoning] " if self.tty else "[reasoning] ")
            self.open = True
        self.out.write(d.text)
        self.out.flush()

    def close(self) -> None:
        """Call when the answer's text (or the end) arrives."""
        if self.open:
            self.out.write(f"{self.RESET}\n" if self.tty else "\n")
            self.out.flush()
            self.open = False
        if self.redacted and not self.hide:
            self.out.write(f"[reasoning] {self.redacted} redacted block(s) (kept for the next turn)\n")
            self.redacted = 0
