"""What the guards did to one call, as plain data for the audit entry and the events.

Verdicts are on ``call.event.guard_verdicts`` already; this adds what they cannot carry:
the safe details (which kinds of data, how tokens were counted), and for the answer how
much text was scanned and how much released (a stream cut by a block releases less than
it scanned; one abandoned by the client records no output verdicts at all).
"""

from __future__ import annotations

from typing import Any

from gateway.guards.input_check import DETAILS
from gateway.guards.stream_guard import OUTPUT_STATE
from gateway.pipeline import CallContext


def guard_summary(call: CallContext) -> dict[str, Any] | None:
    """``{"verdicts": [...], "input": {...}, "output": {...}}``, or None when no guard ran.

    Never holds matched text: details are descriptions such as "personal data: EMAIL"."""
    verdicts = [
        {
            "scanner": v.scanner,
            "stage": v.stage,
            "action": v.action,
            "score": round(v.score, 4),
            "latency_s": round(v.latency_s, 6),
        }
        for v in call.event.guard_verdicts
    ]
    details = call.state.get(DETAILS)
    output = call.state.get(OUTPUT_STATE)
    if not verdicts and details is None and output is None:
        return None
    return {"verdicts": verdicts, "input": {"details": details or {}}, "output": output}
