"""The guards' refusals, in OpenAI's error shape (rendered by gateway.errors' handler).

Messages name the scanner, never what it matched (the matched text may be the very
secret or personal data the guard keeps from leaking).
"""

from __future__ import annotations

from typing import Literal

from gateway.errors import GatewayError, ServiceUnavailable


class GuardBlocked(GatewayError):
    """An input scanner whose policy says block found something: nothing is forwarded."""

    status = 400
    type = "invalid_request_error"
    code = "guard_blocked"

    def __init__(self, scanner: str, stage: Literal["input", "output"] = "input") -> None:
        what = "request" if stage == "input" else "answer"
        super().__init__(f"The {what} was blocked by the {stage} guard '{scanner}'.")
        self.scanner = scanner
        self.stage = stage

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-bastion-guard", f"block={self.scanner}".encode())]


class AnswerBlocked(GuardBlocked):
    """An output scanner whose policy says block found something in the model's answer.

    422: the request was well formed (not a 400) and retrying it is unlikely to help (the
    official clients retry 5xx, 408, 409 and 429, not 422); the upstream did not fail
    (not a 502). In a stream that already started it is the final SSE error event.
    """

    status = 422
    code = "output_guard_blocked"

    def __init__(self, scanner: str) -> None:
        super().__init__(scanner, "output")

    def headers(self) -> list[tuple[bytes, bytes]]:
        # x-bastion-guard carries the input's verdict; the answer's has its own header.
        return [(b"x-bastion-guard-output", f"block={self.scanner}".encode())]


class GuardUnavailable(ServiceUnavailable):
    """A scanner failed or timed out and its policy fails closed."""

    code = "guard_unavailable"

    def __init__(self, scanner: str) -> None:
        super().__init__(f"The guard '{scanner}' could not check this call; try again.")
        self.scanner = scanner


class UnscannablePrompt(GatewayError):
    """Token-id prompts cannot be scanned as text and ``guards.token_prompts`` is block."""

    status = 400
    type = "invalid_request_error"
    code = "guard_unscannable_prompt"
