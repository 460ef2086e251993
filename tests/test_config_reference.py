"""The README's configuration reference names every key the config accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from broker.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is None:
            keys.append(path)
            continue
        is_list = get_origin(field.annotation) is list
        keys.extend(config_keys(sub, f"{path}[]." if is_list else f"{path}."))
    return keys


def test_every_config_key_is_documented() -> None:
    text = README.read_text()
    reference = text[text.index("## Configuration reference") : text.index("## Development")]
    keys = config_keys(Settings)
    assert "providers[].base_url" in keys and "routing.breaker.cooldown_seconds" in keys
    missing = []
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        # Rows name a key by its full path, or by its leaf inside that section's table.
        if f"`{key}`" not in reference and f"`{leaf}`" not in reference:
            missing.append(key)
    assert not missing, f"README configuration reference lacks: {missing}"
