"""Devices' HTTP credentials (cloud_hub.device_credentials) and the piece routes' Range parsing:
a token is good only as made, for its device, before its expiry; a desired state offers one only
with a pieces URL and to a device whose access is not revoked."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.device_credentials import CredentialKey, offer
from cloud_hub.models import Device
from cloud_hub.routes.pieces import _span
from edgeglm.errors import AccessError, ProtocolError
from edgeglm.protocol import Desired, decode, encode

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def key() -> CredentialKey:
    return CredentialKey(Ed25519PrivateKey.generate())


def test_a_token_names_its_device_and_epoch(key: CredentialKey) -> None:
    token = key.issue("box-1", 3, NOW + 60)
    assert key.check(token, now=NOW) == ("box-1", 3)
    assert token.startswith("egd1:box-1:3:")


@pytest.mark.parametrize(
    "forge",
    [
        lambda t: t.replace("box-1", "box-2"),  # another device's name on box-1's MAC
        lambda t: t.replace(":3:", ":4:"),  # a later epoch
        lambda t: t.replace(":3:", ":003:"),  # the same epoch, spelled another way
        lambda t: t.replace(f":{int(NOW + 60)}:", f":0{int(NOW + 60)}:"),  # the same expiry, too
        lambda t: t.replace(f":{int(NOW + 60)}:", f":{int(NOW + 10**6)}:"),  # a later expiry
        lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),  # a flipped MAC character
        lambda t: t[:-2],  # a cut MAC
        lambda t: "egd2" + t[4:],  # another version
        lambda t: t + "\n",  # a trailing newline ("$" alone would match before it)
        lambda t: "",
    ],
)
def test_an_altered_token_is_refused(key: CredentialKey, forge) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AccessError):
        key.check(forge(key.issue("box-1", 3, NOW + 60)), now=NOW)


def test_a_token_of_another_fleet_key_is_refused(key: CredentialKey) -> None:
    other = CredentialKey(Ed25519PrivateKey.generate())
    with pytest.raises(AccessError, match="not valid"):
        key.check(other.issue("box-1", 0, NOW + 60), now=NOW)


def test_an_expired_token_is_refused(key: CredentialKey) -> None:
    token = key.issue("box-1", 0, NOW + 60)
    key.check(token, now=NOW + 59)
    with pytest.raises(AccessError, match="expired"):
        key.check(token, now=NOW + 60)


def test_a_desired_state_offers_a_token_only_with_a_url_and_to_an_allowed_device(key: CredentialKey) -> None:
    device = Device(id="box-1", profile="p", http_epoch=2, http_revoked=False)
    assert offer(key, None, device, NOW) == (None, None)
    assert offer(None, "http://hub", device, NOW) == (None, None)
    url, token = offer(key, "http://hub:8080", device, NOW + 60)
    assert url == "http://hub:8080" and token is not None
    assert key.check(token, now=NOW) == ("box-1", 2)
    device.http_revoked = True
    assert offer(key, "http://hub:8080", device, NOW + 60) == (None, None)


def test_the_offer_travels_whole_in_the_desired_state(key: CredentialKey) -> None:
    body = {"model": "m", "version": "1.0.0", "manifest_digest": "blake3:" + "0" * 64, "profile": "p"}
    token = key.issue("box-1", 0, NOW)
    d = Desired(**body, issued_at=0, pieces_url="https://cdn.example.com/edge", pieces_token=token)
    assert decode(Desired, encode(d)) == d
    with pytest.raises(ValueError, match="come together"):
        Desired(**body, issued_at=0, pieces_url="https://cdn.example.com/edge")
    for url in ("ftp://h", "http://user:pw@h", "https://h/x?token=1", "http://h/#f", "http://" + "a" * 300):
        with pytest.raises((ValueError, ProtocolError)):
            Desired(**body, issued_at=0, pieces_url=url, pieces_token=token)


@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=90-1000", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=9-0", 100, None),  # does not parse as a range: the whole body
        ("bytes=0-1,5-6", 100, None),  # several ranges: the whole body
        ("items=0-1", 100, None),
        ("bytes=-", 100, None),
    ],
)
def test_a_range_header_is_one_span_or_unsatisfiable_or_ignored(header: str, size: int, span: object) -> None:
    assert _span(header, size) == span


def test_the_hub_refuses_a_pieces_url_it_could_not_put_in_a_desired_state() -> None:
    from cloud_hub.settings import HubSettings
    from edgeglm.errors import ConfigError

    assert HubSettings.from_env({"EDGEGLM_HUB_PIECES_URL": "https://cdn.example.com/e"}).pieces_url
    assert HubSettings.from_env({}).pieces_url is None
    assert HubSettings.from_env({"EDGEGLM_HUB_PIECES_URL": "https://cdn:65535"}).pieces_url
    for bad in ("ftp://cdn", "https://cdn/x?y=1", "cdn.example.com", "https://hub:99999", "http://hub:0"):
        with pytest.raises(ConfigError, match="--pieces-url"):
            HubSettings.from_env({"EDGEGLM_HUB_PIECES_URL": bad})


def test_the_hub_warns_at_start_when_box_tokens_would_travel_in_clear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cloud_hub.db import migrate
    from cloud_hub.server import build_context
    from cloud_hub.settings import HubSettings

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    migrate(url)
    warned = {}
    for pieces_url in (
        "http://hub.example:8080",
        "http://127.0.0.1:8080",
        "http://[::1]",
        "https://hub.example",
    ):
        caplog.clear()
        ctx = build_context(HubSettings(data_dir=tmp_path / "hub", db_url=url, pieces_url=pieces_url))
        ctx.db.dispose()
        warned[pieces_url] = any("travels in clear" in r.getMessage() for r in caplog.records)
    assert warned == {
        "http://hub.example:8080": True,
        "http://127.0.0.1:8080": False,
        "http://[::1]": False,
        "https://hub.example": False,
    }
