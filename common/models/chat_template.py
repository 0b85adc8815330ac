"""Render a model's chat template (jinja2) the way transformers does.

Chat templates are written against transformers' rendering environment: a sandbox with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that keeps
non-ASCII text, and the ``raise_exception`` / ``strftime_now`` helpers. Rendering with plain
jinja2 defaults gives different whitespace, so the prompt (and then the model's answer) would
differ from what the model was fine-tuned on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """The template is missing or failed to render (the message names the template's complaint)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse (line {exc.lineno}): {exc}") from exc


def validate_messages(messages: Sequence[Message]) -> list[Message]:
    """Messages are ``{"role": str, "content": str}`` dicts; anything else is a caller bug."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {index} must be a dict with a string 'role', "
                             f"got {message!r}")
        if "content" in message and not isinstance(message["content"], (str, list, type(None))):
            raise ValueError(f"message {index} has content of type {type(message['content'])}")
        out.append(dict(message))
    return out


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, **extra: Any) -> str:
    """The prompt text for ``messages``; ``special_tokens`` supplies ``bos_token`` etc."""
    import jinja2

    compiled = _compile(template)
    context: dict[str, Any] = dict(special_tokens or {})
    context.update(extra)
    try:
        return str(compiled.render(messages=validate_messages(messages),
                                   add_generation_prompt=add_generation_prompt, **context))
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
