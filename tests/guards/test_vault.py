"""The PII vault: placeholders, restoration, pieces split anywhere, conversations."""

from __future__ import annotations

from gateway.guards.vault import PIIVault, StreamRestorer, VaultStore


def test_placeholders_are_stable_and_distinct() -> None:
    vault = PIIVault()
    a = vault.placeholder("EMAIL", "a@example.com")
    b = vault.placeholder("EMAIL", "b@example.com")
    assert (a, b) == ("[EMAIL_1]", "[EMAIL_2]")
    assert vault.placeholder("EMAIL", "a@example.com") == a
    assert vault.placeholder("PHONE", "+44 20 7946 0958") == "[PHONE_1]"
    assert "a@example.com" in vault and "c@example.com" not in vault


def test_literal_placeholders_are_never_issued() -> None:
    vault = PIIVault()
    vault.reserve_literals("the template uses [EMAIL_1] and [EMAIL_2]")
    issued = vault.placeholder("EMAIL", "a@example.com")
    assert issued == "[EMAIL_3]"
    # The caller's literal text stays literal when the model repeats it.
    assert vault.restore("[EMAIL_1] [EMAIL_3]") == "[EMAIL_1] a@example.com"


def test_restore_only_issued_placeholders_and_json_escaping() -> None:
    vault = PIIVault()
    vault.placeholder("EMAIL", 'o"neil@example.com')
    assert vault.restore("to [EMAIL_1], not [EMAIL_9]") == 'to o"neil@example.com, not [EMAIL_9]'
    assert (
        vault.restore('{"to": "[EMAIL_1]"}', json_string=True) == '{"to": "o\\"neil@example.com"}'
    )


def test_stream_restorer_at_every_split() -> None:
    vault = PIIVault()
    vault.placeholder("EMAIL", "jane@example.com")
    vault.placeholder("CREDIT_CARD", "4111 1111 1111 1111")
    text = "Write to [EMAIL_1], charge [CREDIT_CARD_1] [x] [EMAIL_2] end ["
    expected = vault.restore(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            restorer = StreamRestorer(vault)
            out = restorer.feed(text[:i]) + restorer.feed(text[i:j]) + restorer.feed(text[j:])
            out += restorer.flush()
            assert out == expected, (i, j)


def test_stream_restorer_one_character_at_a_time_never_leaks_a_placeholder_part() -> None:
    vault = PIIVault()
    vault.placeholder("EMAIL", "jane@example.com")
    restorer = StreamRestorer(vault)
    pieces = [restorer.feed(ch) for ch in "see [EMAIL_1] now"]
    assert "".join(pieces) + restorer.flush() == "see jane@example.com now"
    assert not any(p.startswith("[") or "EMAIL" in p for p in pieces)


def test_conversation_vaults_are_per_key_and_expire() -> None:
    store = VaultStore(ttl_s=3600, max_entries=2)
    mine = store.get("key-a", "conv-1")
    mine.placeholder("EMAIL", "a@example.com")
    assert store.get("key-a", "conv-1") is mine
    assert store.get("key-b", "conv-1") is not mine  # another caller, same conversation id
    store.get("key-a", "conv-2")
    store.get("key-a", "conv-3")  # bounded: the least recently used is dropped
    assert store.get("key-b", "conv-1") is not mine
    expired = VaultStore(ttl_s=1e-9, max_entries=10)
    first = expired.get("k", "c")
    assert expired.get("k", "c") is not first
