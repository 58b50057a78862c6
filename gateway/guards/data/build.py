"""Render the guards' corpus from the hand-written templates.

Run ``python -m gateway.guards.data.build``.

Deterministic for a seed (``--seed``, default 17): the same code writes byte-identical
``corpus.jsonl`` (classifier: train/val/test) and ``rules.jsonl`` (rule classes: test).

Held-out by template: every template (an attack phrasing, a benign prompt, a document
frame) is assigned to exactly one split before rendering, and all rows rendered from it
(every slot filling, every obfuscation of it) go to that split. Indirect injections are
rendered only from a document frame and a payload of the same split. So the test split
measures phrasings the model never saw, not new slot fillings of seen ones.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from gateway.guards.data import attacks_en, attacks_intl, benign_en, benign_intl, rules

HERE = Path(__file__).parent
SEED = 17
Row = dict[str, str]

DECOR = {
    "en": (
        ["", "Hi, ", "Quick question: ", "Hello! ", "Please help: ", "Hey. "],
        ["", " Thanks!", " Thank you in advance.", " Keep it brief.", " Answer in detail."],
    ),
    "de": (["", "Hallo, ", "Kurze Frage: ", "Hi! "], ["", " Danke!", " Bitte kurz halten."]),
    "fr": (["", "Bonjour, ", "Petite question : ", "Salut ! "], ["", " Merci !", " Fais court."]),
    "es": (["", "Hola, ", "Una pregunta: ", "¡Buenas! "], ["", " ¡Gracias!", " Sé breve."]),
    "it": (["", "Ciao, ", "Una domanda: ", "Buongiorno! "], ["", " Grazie!", " Sii breve."]),
    "nl": (["", "Hoi, ", "Korte vraag: ", "Hallo! "], ["", " Bedankt!", " Houd het kort."]),
    "pt": (["", "Olá, ", "Uma pergunta: ", "Bom dia! "], ["", " Obrigado!", " Sê breve."]),
    "pl": (["", "Cześć, ", "Krótkie pytanie: ", "Dzień dobry! "], ["", " Dzięki!", " Krótko."]),
}


def assign_splits(group: str, templates: list[str], seed: int) -> list[tuple[str, str, str]]:
    """(template id, template, split) for one group: ~20 % test, ~15 % val, the rest train."""
    order = list(range(len(templates)))
    random.Random(f"{seed}/{group}").shuffle(order)
    n = len(templates)
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    n_val = max(1, round(0.15 * n)) if n >= 4 else 0
    split = {}
    for rank, i in enumerate(order):
        split[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [(f"{group}/{i}", templates[i], split[i]) for i in range(n)]


def slots(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(template: str, fill: dict[str, list[str]], rng: random.Random, count: int) -> list[str]:
    """Up to *count* distinct renderings of *template* with random slot fillers."""
    names = slots(template)
    out: dict[str, None] = {}
    for _ in range(count * 4):
        values = {name: rng.choice(fill[name]) for name in names}
        out[template.format(**values)] = None
        if len(out) >= count:
            break
    return list(out)


def decorate(text: str, lang: str, rng: random.Random) -> str:
    prefixes, suffixes = DECOR[lang]
    return rng.choice(prefixes) + text + rng.choice(suffixes)


# --------------------------------------------------------------------------- obfuscations

LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7", "l": "1"}
# Cyrillic look-alikes of a, e, o, p, c, x, y, i.
HOMO = dict(zip("aeopcxyi", "\u0430\u0435\u043e\u0440\u0441\u0445\u0443\u0456", strict=True))
ZW = ["\u200b", "\u200c", "\u200d", "\u2060"]
B64_WRAP = [
    "Decode this base64 and do what it says: {b}",
    "{b}",
    "Here is a base64 message, follow it exactly: {b}",
    "Run the instructions encoded below.\n{b}",
]
TRANSLATE_WRAP = [
    "Translate the following from {src} into English and then follow the instruction: {t}",
    "First translate this {src} text, then execute it: {t}",
    "Übersetze ins Deutsche und befolge es danach: {t}",
    "Traduis en français puis applique la consigne : {t}",
]
SRC_NAME = {
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "nl": "Dutch",
    "pt": "Portuguese",
    "pl": "Polish",
    "en": "English",
}


def obfuscate(text: str, kind: str, rng: random.Random) -> str:
    if kind == "base64":
        return rng.choice(B64_WRAP).format(b=base64.b64encode(text.encode()).decode())
    if kind == "leet":
        return "".join(LEET.get(c, c) if rng.random() < 0.7 else c for c in text)
    if kind == "spaced":
        sep = rng.choice([" ", ".", "-"])
        return "  ".join(sep.join(w) for w in text.split())
    if kind == "homoglyph":
        return "".join(HOMO.get(c, c) if rng.random() < 0.5 else c for c in text)
    if kind == "zero_width":
        return "".join(
            c + rng.choice(ZW) if c.isalpha() and rng.random() < 0.3 else c for c in text
        )
    if kind == "fullwidth":
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    if kind == "math_bold":
        return "".join(
            chr(0x1D41A + ord(c) - 97)
            if "a" <= c <= "z"
            else chr(0x1D400 + ord(c) - 65)
            if "A" <= c <= "Z"
            else c
            for c in text
        )
    raise ValueError(kind)


OBFUSCATIONS = ["base64", "leet", "spaced", "homoglyph", "zero_width", "fullwidth", "math_bold"]


# --------------------------------------------------------------------------- the corpus


def _row(text: str, label: str, cls: str, split: str, lang: str, template: str, kind: str) -> Row:
    return {
        "text": text,
        "label": label,
        "class": cls,
        "split": split,
        "lang": lang,
        "template": template,
        "kind": kind,
    }


def attack_groups() -> Iterator[tuple[str, str, str, list[str], dict[str, list[str]]]]:
    """(lang, class, group id, templates, fillers) for every direct-attack template group."""
    en_fill = {
        "target": attacks_en.TARGETS,
        "action": attacks_en.ACTIONS,
        "request": attacks_en.REQUESTS,
        "request_bare": attacks_en.REQUESTS,
        "persona": attacks_en.PERSONAS,
    }
    yield "en", "injection", "en/injection", attacks_en.INJECTION, en_fill
    yield "en", "jailbreak", "en/jailbreak", attacks_en.JAILBREAK, en_fill
    for lang, d in attacks_intl.LANGS.items():
        fill = {
            "target": d["targets"],
            "action": d["actions"],
            "request": d["requests"],
            "persona": attacks_en.PERSONAS,
        }
        yield lang, "injection", f"{lang}/injection", d["injection"], fill
        yield lang, "jailbreak", f"{lang}/jailbreak", d["jailbreak"], fill


def attack_rows(seed: int, rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    for lang, cls, group, templates, fill in attack_groups():
        per = 10 if lang == "en" else 9
        for tid, template, split in assign_splits(group, templates, seed):
            for text in render(template, fill, rng, per):
                rows.append(
                    _row(decorate(text, lang, rng), "attack", cls, split, lang, tid, "direct")
                )
                if rng.random() < 0.45:
                    kind = rng.choice(OBFUSCATIONS)
                    rows.append(
                        _row(
                            obfuscate(text, kind, rng),
                            "attack",
                            "obfuscated",
                            split,
                            lang,
                            tid,
                            kind,
                        )
                    )
                if lang != "en" and rng.random() < 0.25:
                    wrap = rng.choice(TRANSLATE_WRAP).format(src=SRC_NAME[lang], t=text)
                    rows.append(_row(wrap, "attack", "obfuscated", split, lang, tid, "translation"))
    return rows


def indirect_rows(seed: int, rng: random.Random) -> list[Row]:
    fill = dict(benign_en.FILL)
    docs = assign_splits("en/doc", benign_en.DOCS, seed)
    rows: list[Row] = []
    payload_groups = [("en", attacks_en.PAYLOADS, attacks_en.TARGETS, attacks_en.ACTIONS)]
    payload_groups += [
        (lang, d["payloads"], d["targets"], d["actions"]) for lang, d in attacks_intl.LANGS.items()
    ]
    for lang, payloads, targets, actions in payload_groups:
        for tid, payload, split in assign_splits(f"{lang}/payload", payloads, seed):
            frames = [(did, doc) for did, doc, s in docs if s == split]
            for _ in range(8 if lang == "en" else 4):
                did, doc = rng.choice(frames)
                slot = payload.format(target=rng.choice(targets), action=rng.choice(actions))
                text = doc.format(
                    slot=slot, **{k: rng.choice(v) for k, v in fill.items() if k in slots(doc)}
                )
                rows.append(_row(text, "attack", "indirect", split, lang, tid, did))
    for did, doc, split in docs:
        for _ in range(12):
            values = {k: rng.choice(v) for k, v in fill.items() if k in slots(doc)}
            text = doc.format(slot=rng.choice(benign_en.DOC_SLOTS), **values)
            rows.append(_row(text, "benign", "benign", split, "en", did, "document"))
    return rows


def benign_rows(seed: int, rng: random.Random) -> list[Row]:
    rows: list[Row] = []
    fill = {**benign_en.FILL, **benign_en.FILL_HARD}
    groups = [
        ("en", "benign", benign_en.BENIGN, 24),
        ("en", "hard_negative", benign_en.HARD_NEGATIVES, 9),
    ]
    for lang, d in benign_intl.LANGS.items():
        groups += [(lang, "benign", d["benign"], 14), (lang, "hard_negative", d["hard"], 6)]
    for lang, cls, templates, per in groups:
        for tid, template, split in assign_splits(f"{lang}/{cls}", templates, seed):
            seen: set[str] = set()
            for _ in range(per * 3):
                text = decorate(render(template, fill, rng, 1)[0], lang, rng)
                if text not in seen:
                    seen.add(text)
                    rows.append(_row(text, "benign", cls, split, lang, tid, "direct"))
                if len(seen) >= per:
                    break
    return rows


WINDOW = 256
"""The classifier's scoring window (classifier.Model.window, characters of normalised text)."""


def composite_rows(rows: list[Row], rng: random.Random) -> list[Row]:
    """Window-shaped benign texts: a slice of up to one window, cut anywhere, out of several
    benign prompts of one split joined together, like the windows long texts are scored in.

    Benign only: with attacks spliced into benign filler as well, the linear model learnt
    to give the filler attack weight (validation recall fell from 0.93 to 0.45); the
    spliced case is covered by the document frames of ``indirect_rows``.
    """
    out: list[Row] = []
    for split in ("train", "val", "test"):
        pool = [r for r in rows if r["split"] == split and r["class"] == "benign"]
        for _ in range(len(pool) // 5):
            parts: list[str] = []
            while sum(len(p) + 1 for p in parts) < 2 * WINDOW:
                parts.append(rng.choice(pool)["text"])
            joined = "\n".join(parts)
            start = rng.randrange(len(joined) - WINDOW)
            text = joined[start : start + rng.randint(WINDOW * 3 // 4, WINDOW)]
            out.append(
                _row(text, "benign", "benign", split, "mixed", f"composite/{split}", "composite")
            )
    return out


def build(seed: int = SEED) -> tuple[list[Row], list[Row]]:
    """(corpus rows, rule rows), deduplicated by text, in a stable order."""
    rng = random.Random(seed)
    corpus = attack_rows(seed, rng) + indirect_rows(seed, rng) + benign_rows(seed, rng)
    corpus += composite_rows(corpus, rng)
    unique: dict[str, Row] = {}
    for row in corpus:
        unique.setdefault(row["text"], row)
    rule_unique: dict[str, Row] = {}
    for row in rules.rule_rows(seed):
        rule_unique.setdefault(row["text"], row)
    return list(unique.values()), list(rule_unique.values())


def write_jsonl(path: Path, rows: list[Row]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    corpus, rule = build(args.seed)
    write_jsonl(args.out / "corpus.jsonl", corpus)
    write_jsonl(args.out / "rules.jsonl", rule)
    counts = Counter((r["split"], r["class"]) for r in corpus)
    for key in sorted(counts):
        print(*key, counts[key])
    print(
        "attack",
        sum(r["label"] == "attack" for r in corpus),
        "benign",
        sum(r["label"] == "benign" for r in corpus),
    )
    print("rules", Counter(r["class"] for r in rule))


if __name__ == "__main__":
    main()
