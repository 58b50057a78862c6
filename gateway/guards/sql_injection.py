"""Scanner ``sql_injection``: SQL injection payloads aimed at a tool, not SQL being discussed.

llm-guard has no such scanner. An agent that turns a prompt into a database query passes
the caller's words into SQL; the payloads that matter break out of a value and change the
query's structure. The scanner:

1. finds candidates cheaply: a quote that opens no string of its own followed by SQL
   (``admin' OR '1'='1``, ``x' UNION SELECT ...``, ``'; DROP TABLE ...``, ``admin'--``),
   a number followed by a tautology or a UNION, a stacked destructive statement,
   time-based and out-of-band functions (``SLEEP(5)``, ``xp_cmdshell``...);
2. proves a break-out with sqlglot: the candidate is placed as the value of
   ``SELECT a FROM t WHERE c = '<value>' AND d = 'w'``; a payload that parses and
   yields a UNION, a second statement, a literal-only OR (tautology) or drops the
   ``d`` condition (comment truncation) changed the query: score 0.95;
3. tells discussion from attack: text that asks about SQL injection (``sql injection``,
   ``vulnerable``, ``parameterized``...) or reviews code, with the SQL inside a code span,
   scores 0.4 of the attack's score, under the default threshold. SQL that only is a
   query (``SELECT ... WHERE name = 'x' OR id = 3`` in a code review) is not a candidate.
"""

from __future__ import annotations

import re
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from gateway.guards.scanner import Finding, ScanContext, Span

_KEYWORDS = r"(?:or|and|union|having|order\s+by|group\s+by|;|--|#|/\*|\|\|)"
_QUOTE_BREAK = re.compile(r"(['\"`])\s*\)*\s*" + _KEYWORDS + r"(?![a-z])", re.IGNORECASE)
_NUMERIC = re.compile(
    r"\b\d+\s*\)*\s+(?:(?:or|\|\|)\s+\(?\s*(?:[\w'\"]+\s*(?:=|<|>|like)\s*[\w'\"]+|true|not\s+false)"
    r"|union\s+(?:all\s+)?select)",
    re.IGNORECASE,
)
_STACKED = re.compile(
    r"([\"'\d]\s*\)*\s*)?;\s*(?:drop\s+(?:table|database)|delete\s+from|truncate\s+table|shutdown"
    r"|exec(?:ute)?\s+(?:xp_|sp_)|insert\s+into|update\s+\w+\s+set|alter\s+(?:table|user)"
    r"|grant\s+all|create\s+user)\b",
    re.IGNORECASE,
)
_FUNCTIONS = re.compile(
    r"\b(?:sleep\s*\(\s*\d|pg_sleep\s*\(|benchmark\s*\(\s*\d|waitfor\s+delay\s+'|xp_cmdshell"
    r"|load_file\s*\(|into\s+(?:out|dump)file|utl_http|dbms_pipe|extractvalue\s*\(\s*\d"
    r"|updatexml\s*\(\s*\d|@@version|convert\s*\(\s*int\s*,|concat\s*\(\s*0x)",
    re.IGNORECASE,
)
# Substring tests on the lower-cased text (C speed) decide which expressions run at all.
_FUNCTION_WORDS = (
    "sleep", "benchmark", "waitfor", "xp_", "load_file", "outfile", "dumpfile", "utl_",
    "dbms_", "extractvalue", "updatexml", "@@version", "convert(", "concat(",
)  # fmt: skip
_DISCUSSION = re.compile(
    r"(?i)\b(?:sql[\s-]*injection|sqli|injection attacks?|vulnerab\w*|parameteri[sz]\w*"
    r"|prepared statements?|sanitiz\w*|escap\w+|owasp|code review|review (?:this|my|the)"
    r"|is (?:this|it) (?:safe|secure)|explain|review|pull request|migration|pentest|payloads?"
    r"|unit test|how (?:do|can|should) (?:we|i) (?:fix|prevent|stop))\b"
)
# Words that only someone discussing or defending against SQL injection uses.
_NAMES_THE_ATTACK = re.compile(
    r"(?i)sql[\s-]*injection|sqli\b|injection|vulnerab|pentest|penetration test|payloads?\b"
    r"|parameteri[sz]|prepared statement|sanitiz|unit test|owasp|\bwaf\b"
)
_CODE_SPAN = re.compile(r"```[\s\S]*?(?:```|$)|`[^`\n]+`")
_WORD_APOSTROPHE = re.compile(r"(?<=[^\W\d_])['\u2019](?=[^\W\d_])")

_TEMPLATE_HEAD = {"'": "SELECT a FROM t WHERE c = 'v", '"': 'SELECT a FROM t WHERE c = "v'}
_TEMPLATE_TAIL = {"'": "' AND d = 'w'", '"': "\" AND d = 'w'"}
_NUMERIC_HEAD = "SELECT a FROM t WHERE c = "
_NUMERIC_TAIL = " AND d = 'w'"
_DESTRUCTIVE = (exp.Drop, exp.Delete, exp.Insert, exp.Update, exp.Command, exp.Create, exp.Alter)


def _literal_only(node: Any) -> bool:
    """A comparison or constant with no column in it: true whatever the row (a tautology)."""
    if isinstance(node, exp.Paren):
        return _literal_only(node.this)
    if isinstance(node, exp.Boolean | exp.Literal):
        return True
    if isinstance(node, exp.Predicate | exp.Binary) and not isinstance(node, exp.Connector):
        return not any(True for _ in node.find_all(exp.Column))
    if isinstance(node, exp.Not):
        return _literal_only(node.this)
    return False


def _changed(statements: list[Any]) -> str | None:
    """What a parsed template shows beyond its own one condition pair, if anything."""
    parsed = [s for s in statements if s is not None]
    if len(parsed) > 1:
        return "stacked_query"
    if not parsed:
        return None
    tree = parsed[0]
    if isinstance(tree, exp.Union) or tree.find(exp.Union):
        return "union"
    if isinstance(tree, _DESTRUCTIVE):
        return "stacked_query"
    ors = list(tree.find_all(exp.Or))
    for connector in ors:
        if any(_literal_only(node) for node in connector.find_all(exp.Predicate, exp.Boolean)):
            return "tautology"
    columns = {c.name for c in tree.find_all(exp.Column)}
    if "d" not in columns:
        return "comment_truncation"
    for connector in ors:
        if all(_comparison(side) for side in (connector.left, connector.right)):
            return "or_injection"
    return None


def _comparison(node: Any) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Connector):
        return _comparison(node.left) and _comparison(node.right)
    return isinstance(node, exp.Predicate)


def _parses(sql: str) -> str | None:
    for dialect in ("mysql", "postgres", "tsql"):
        try:
            return _changed(sqlglot.parse(sql, read=dialect))
        except (SqlglotError, ValueError, RecursionError):
            continue
    return None


def _variants(payload: str, quote: str | None) -> list[str]:
    """The payload as written, without what closes the sentence or the JSON around it,
    and without the quote that closes the value it was written in."""
    out = [payload]
    bare = payload.rstrip(".,!?;:}])\"'" if quote is None else ".,!?;:}]")
    if bare != payload:
        out.append(bare)
    if quote is not None and bare.endswith(quote) and len(bare) > 1:
        out.append(bare[:-1])
    return out


def _breaks_out(text: str, start: int, quote: str | None) -> str | None:
    """Whether ``text[start:]``, put in a query as a value, changes that query.

    The value sits in ``WHERE c = <value> AND d = 'w'``, or in ``WHERE (c = <value> AND
    d = 'w')`` for payloads that close a parenthesis."""
    line_end = text.find("\n", start)
    tail = text[start : line_end if line_end >= 0 else len(text)][:240]
    words = tail.split(" ")
    # The payload may be followed by prose; try it whole, then shorter, a word at a time.
    for cut in range(len(words), 0, -1):
        payload = " ".join(words[:cut])
        if not payload.strip():
            break
        for variant in _variants(payload, quote):
            head, tail_sql = (
                (_TEMPLATE_HEAD[quote], _TEMPLATE_TAIL[quote])
                if quote in _TEMPLATE_HEAD
                else (_NUMERIC_HEAD, _NUMERIC_TAIL)
            )
            templates = [(head, tail_sql)]
            if ")" in variant:
                templates.append((head.replace("WHERE ", "WHERE ("), tail_sql + ")"))
            for before, after in templates:
                found = _parses(before + variant + after)
                if found is not None:
                    return found
        if len(words) - cut >= 12:
            break
    return None


def _opens_no_string(text: str, pos: int) -> bool:
    """The quote at ``pos`` closes no string begun on its line: it breaks out of a value."""
    line_start = text.rfind("\n", 0, pos) + 1
    before = _WORD_APOSTROPHE.sub("", text[line_start:pos])
    return before.count(text[pos]) % 2 == 0


class SQLInjectionScanner:
    """Finds SQL injection payloads (see the module docstring)."""

    name = "sql_injection"

    def scan(self, text: str, context: ScanContext) -> Finding | None:
        low = text.lower()
        quoted = "'" in text or '"' in text
        ored = " or " in low or "||" in low or "union" in low
        stacked = ";" in text
        functions = any(word in low for word in _FUNCTION_WORDS)
        if not (quoted or ored or stacked or functions):
            return None
        spans: list[Span] = []
        score = 0.0
        for match in _QUOTE_BREAK.finditer(text) if quoted else ():
            pos = match.start(1)
            if match.group(1) != "`" and _opens_no_string(text, pos):
                found = _breaks_out(text, pos, match.group(1))
                if found is not None:
                    spans.append(Span(pos, _line_end(text, pos), found))
                    score = max(score, 0.8 if found == "or_injection" else 0.95)
        for match in _NUMERIC.finditer(text) if ored else ():
            found = _breaks_out(text, match.start(), None)
            if found in ("tautology", "union", "stacked_query"):
                spans.append(Span(match.start(), _line_end(text, match.start()), found))
                score = max(score, 0.9)
        for match in _STACKED.finditer(text) if stacked else ():
            spans.append(Span(match.start(), _line_end(text, match.start()), "stacked_query"))
            score = max(score, 0.8 if match.group(1) else 0.45)
        for match in _FUNCTIONS.finditer(text) if functions else ():
            spans.append(Span(match.start(), match.end(), "sql_function"))
            score = max(score, 0.75)
        if not spans:
            return None
        if _DISCUSSION.search(text) and _in_code_or_discussion(text, spans):
            score *= 0.4
        return Finding(
            score=score,
            spans=spans,
            suggested="block",
            detail="SQL injection: " + ", ".join(sorted({s.label for s in spans})),
        )


def _in_code_or_discussion(text: str, spans: list[Span]) -> bool:
    """Every payload sits in a code span, or the text names SQL injection outright."""
    if _NAMES_THE_ATTACK.search(text):
        return True
    code = [m.span() for m in _CODE_SPAN.finditer(text)]
    return all(any(a <= s.start < b for a, b in code) for s in spans)


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end
