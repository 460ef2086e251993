"""The strict-mode rules for JSON schemas (structured outputs and strict tools), checked
before any upstream call so a caller learns which path of its schema is wrong.

Two profiles, from PROTOCOLS-2026 §2.1 and §2.2:
- "common" (every provider with constrained decoding, checked at the API by convert.py): the
  root is an object and not an anyOf; every object is closed (`additionalProperties: false`);
  no `not`, `if`/`then`/`else`, `dependentRequired`, `dependentSchemas`; `$ref` only local
  (`#/...`).
- "openai" (added by the OpenAI wire): every key of `properties` is in `required` (optional
  fields are `"type": ["string", "null"]`), no `allOf`; at most 10 levels of nesting and 5000
  properties.

Pure functions: a schema (a JSON-ready dict) in, a bounded list of (path, problem) out.
"""

from __future__ import annotations

from typing import Any, Literal

Profile = Literal["common", "openai"]

_NEVER = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas")
# Keywords whose value is one subschema / a list of them / a map of name -> subschema.
_ONE = ("items", "additionalItems", "contains", "propertyNames")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "$defs", "definitions", "patternProperties")

OPENAI_MAX_DEPTH = 10
OPENAI_MAX_PROPERTIES = 5000
MAX_PROBLEMS = 5


def strict_problems(schema: dict[str, Any], path: str, profile: Profile = "common") -> list[tuple[str, str]]:
    """The ways `schema` breaks strict mode under `profile`, at most MAX_PROBLEMS, each with
    its path (`path` is where the schema sits in the request, e.g. `tools[0].parameters`)."""
    walk = _Walk(profile)
    if schema.get("type") != "object":
        walk.problem(path, 'the root must be {"type": "object", ...} in strict mode')
    if "anyOf" in schema:
        walk.problem(f"{path}.anyOf", "the root must not be an anyOf in strict mode")
    walk.node(schema, path, 0)
    if profile == "openai" and walk.properties > OPENAI_MAX_PROPERTIES:
        walk.problem(
            path, f"{walk.properties} object properties, over the {OPENAI_MAX_PROPERTIES} strict mode allows"
        )
    return walk.found


class _Walk:
    __slots__ = ("found", "profile", "properties")

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.found: list[tuple[str, str]] = []
        self.properties = 0

    def problem(self, path: str, what: str) -> None:
        if len(self.found) < MAX_PROBLEMS:
            self.found.append((path, what))

    def node(self, node: Any, path: str, depth: int) -> None:
        if not isinstance(node, dict) or len(self.found) >= MAX_PROBLEMS:
            return
        if self.profile == "openai" and depth > OPENAI_MAX_DEPTH:
            self.problem(path, f"nested deeper than the {OPENAI_MAX_DEPTH} levels strict mode allows")
            return
        for key in _NEVER:
            if key in node:
                self.problem(f"{path}.{key}", f"{key!r} is not supported in strict mode")
        if self.profile == "openai" and "allOf" in node:
            self.problem(f"{path}.allOf", "'allOf' is not supported in OpenAI strict mode")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            self.problem(f"{path}.$ref", "only local references (#/...) are allowed in strict mode")
        if _is_object(node):
            self.object(node, path)
        for key in _ONE:
            self.node(node.get(key), f"{path}.{key}", depth + 1)
        for key in _MANY:
            items = node.get(key)
            if isinstance(items, list):
                for i, sub in enumerate(items):
                    self.node(sub, f"{path}.{key}[{i}]", depth + 1)
        for key in _MAP:
            subs = node.get(key)
            if isinstance(subs, dict):
                for name, sub in subs.items():
                    self.node(sub, f"{path}.{key}.{name}", depth + 1)

    def object(self, node: dict[str, Any], path: str) -> None:
        if node.get("additionalProperties") is not False:
            self.problem(f"{path}.additionalProperties", "must be false on every object in strict mode")
        props = node.get("properties")
        if not isinstance(props, dict):
            return
        self.properties += len(props)
        if self.profile != "openai":
            return
        required = node.get("required")
        listed = set(required) if isinstance(required, list) else set()
        missing = [k for k in props if k not in listed]
        if missing:
            shown = ", ".join(repr(k) for k in missing[:5])
            self.problem(
                f"{path}.required",
                f"must list every property in OpenAI strict mode (missing {shown}); make a field "
                'optional with "type": [..., "null"] instead',
            )


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in node
