"""The workers' admin tokens derived from the operator's key (operator/admin_token.py)."""

from __future__ import annotations

import logging

from tideserve.operator.admin_token import AdminKey, derive_token, recorded, token_digest


def test_a_token_depends_on_the_key_and_on_every_part_of_the_deployments_identity():
    token = derive_token("k", "ns", "name", "uid")
    assert token == derive_token("k", "ns", "name", "uid") and len(token) == 43  # 256 bits, unpadded base64url
    others = {derive_token(*parts) for parts in [("k2", "ns", "name", "uid"), ("k", "ns2", "name", "uid"),
                                                 ("k", "ns", "name2", "uid"), ("k", "ns", "name", "uid2"),
                                                 ("k", "nsn", "ame", "uid")]}  # no ambiguity at the separators
    assert token not in others and len(others) == 5
    assert token_digest(token) != token_digest(others.pop()) and token not in token_digest(token)


def test_the_recorded_annotation_holds_a_secret_uid_and_a_digest():
    assert recorded("abc 0123456789abcdef") == ("abc", "0123456789abcdef")
    assert recorded(None) is None and recorded("") is None and recorded("only-one") is None


def test_a_changed_key_file_rotates_the_token_and_keeps_the_previous_for_unsynced_pods(tmp_path):
    path = tmp_path / "key"
    path.write_text("first-key\n")
    key = AdminKey(str(path))
    assert key.token("ns", "a", "u") == derive_token("first-key", "ns", "a", "u")
    assert key.tokens("ns", "a", "u") == [derive_token("first-key", "ns", "a", "u")]
    assert key.refresh() is False
    path.write_text("second-key-longer\n")
    assert key.refresh() is True and key.refresh() is False
    assert key.tokens("ns", "a", "u") == [derive_token("second-key-longer", "ns", "a", "u"),
                                          derive_token("first-key", "ns", "a", "u")]
    path.write_text("")  # a half-written update keeps the current key
    assert key.refresh() is False and key.token("ns", "a", "u") == derive_token("second-key-longer", "ns", "a", "u")


def test_without_a_key_file_the_key_is_random_and_the_operator_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        first, second = AdminKey(), AdminKey()
    assert "no --admin-key-file" in caplog.text
    assert first.token("ns", "a", "u") != second.token("ns", "a", "u") and first.refresh() is False
