"""The texts of a request body that the input guards scan, and writing cleaned ones back.

Chat: each message's ``content`` (a string, or the ``text`` of each text part), the
``arguments`` of its ``tool_calls`` (and the legacy ``function_call``); completions: the
``prompt`` (a string or a list of them); embeddings: the ``input``. Token-id prompts and
inputs (lists of integers) are not text: they are reported as unscannable.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

Path = tuple[str | int, ...]


@dataclass(slots=True)
class BodyText:
    """One text of a body, where it lives, and who wrote it."""

    path: Path
    text: str
    role: str
    """The message's chat role, or ``prompt`` for completions prompts and embeddings inputs."""
    json_string: bool = False
    """The text is a JSON document inside a string (tool-call arguments)."""
    changed: bool = False


def body_texts(body: dict[str, Any]) -> tuple[list[BodyText], bool]:
    """(the texts, whether some part could not be scanned as text)."""
    texts: list[BodyText] = []
    unscannable = False
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                unscannable |= _message_texts(message, i, texts)
    for field in ("prompt", "input"):
        value = body.get(field)
        if isinstance(value, str):
            texts.append(BodyText((field,), value, "prompt"))
        elif isinstance(value, list):
            for k, item in enumerate(value):
                if isinstance(item, str):
                    texts.append(BodyText((field, k), item, "prompt"))
                elif isinstance(item, int | list):
                    unscannable = True
    return texts, unscannable


def _message_texts(message: dict[str, Any], i: int, into: list[BodyText]) -> bool:
    role = message.get("role")
    role = role if isinstance(role, str) else "user"
    content = message.get("content")
    if isinstance(content, str):
        into.append(BodyText(("messages", i, "content"), content, role))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                into.append(BodyText(("messages", i, "content", j, "text"), part["text"], role))
            elif isinstance(part, str):
                into.append(BodyText(("messages", i, "content", j), part, role))
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for j, call in enumerate(tool_calls):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                path: Path = ("messages", i, "tool_calls", j, "function", "arguments")
                into.append(BodyText(path, function["arguments"], role, json_string=True))
    function_call = message.get("function_call")
    if isinstance(function_call, dict) and isinstance(function_call.get("arguments"), str):
        call_path: Path = ("messages", i, "function_call", "arguments")
        into.append(BodyText(call_path, function_call["arguments"], role, json_string=True))
    return False


def changed_fields(body: dict[str, Any], texts: list[BodyText]) -> dict[str, Any]:
    """Top-level field -> its new value, for each field holding a changed text.

    The original body is left as it was (the caller's request is kept for the audit)."""
    fields: dict[str, Any] = {}
    for item in texts:
        if not item.changed:
            continue
        top = item.path[0]
        assert isinstance(top, str)
        if top not in fields:
            fields[top] = copy.deepcopy(body[top])
        if len(item.path) == 1:
            fields[top] = item.text
            continue
        node = fields[top]
        for step in item.path[1:-1]:
            node = node[step]
        node[item.path[-1]] = item.text
    return fields
