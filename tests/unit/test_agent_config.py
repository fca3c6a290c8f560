"""The agent config: TOML, ``EDGE_AGENT_*`` overrides, a clear ConfigError (exit 78) per mistake."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edgeglm.errors import EXIT_CONFIG, ConfigError


@pytest.fixture
def key(tmp_path: Path) -> Path:
    from edgeglm.keys import create_keypair

    return create_keypair(tmp_path / "keys", "release")[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_then_environment_overrides(tmp_path: Path, key: Path) -> None:
    path = _write(
        tmp_path,
        f'device_id = "box-1"\nprofile = "cpu-x86-int4"\ntrusted_keys = ["{key}"]\n'
        f'data_dir = "{tmp_path / "data"}"\n[cloud]\nurl = "mqtt://hub.example:1884"\nusername = "box-1"\n'
        "[update]\nwindow = 4\n",
    )
    env = {
        "EDGE_AGENT_UPDATE_BANDWIDTH_BYTES_S": "250000",
        "EDGE_AGENT_CLOUD_PASSWORD": "s3cret",
        "EDGE_AGENT_TELEMETRY_HEARTBEAT_S": "5",
        "EDGE_AGENT_LOG_FORMAT": "json",
        "UNRELATED": "x",
    }
    c = load_config(path, env)
    assert (c.device_id, c.profile, c.log_format) == ("box-1", "cpu-x86-int4", "json")
    assert (c.update.window, c.update.bandwidth_bytes_s, c.telemetry.heartbeat_s) == (4, 250000, 5.0)
    s = c.cloud.settings()
    assert (s.host, s.port, s.username, s.password, s.tls) == ("hub.example", 1884, "box-1", "s3cret", False)
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.model_dump())
    assert c.local is None


def test_environment_alone_configures_an_agent(tmp_path: Path, key: Path) -> None:
    env = {
        "EDGE_AGENT_DEVICE_ID": "box-2",
        "EDGE_AGENT_PROFILE": "cpu-x86-int8",
        "EDGE_AGENT_TRUSTED_KEYS": f"{key},{key}",
        "EDGE_AGENT_LOCAL_URL": "mqtt://127.0.0.1:1883",
    }
    c = load_config(None, env)
    assert c.device_id == "box-2" and len(c.trusted_keys) == 2
    assert c.local is not None and c.local.settings().port == 1883


def test_password_file_is_read_and_tls_port_defaults_to_8883(tmp_path: Path, key: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    path = _write(
        tmp_path,
        f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrusted_keys = ["{key}"]\n'
        f'[cloud]\nurl = "mqtts://hub"\nca_file = "{ca}"\nusername = "b"\npassword_file = "{secret}"\n',
    )
    s = load_config(path, {}).cloud.settings()
    assert (s.port, s.tls, s.password) == (8883, True, "from-a-file")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('profile = "cpu-x86-int4"\n', "device_id"),
        ('device_id = "../etc"\nprofile = "cpu-x86-int4"\n', "device_id"),
        ('device_id = "b"\nprofile = "no-such-profile"\n', "profile"),
        ('device_id = "b"\nprofile = "cpu-x86-int4"\ncolour = "blue"\n', "colour"),
        ('device_id = "b"\nprofile = "cpu-x86-int4"\n[cloud]\nurl = "http://hub"\n', "cloud.url"),
        ('device_id = "b"\nprofile = "cpu-x86-int4"\n[cloud]\nurl = "mqtts://hub"\n', "ca_file"),
        ('device_id = "b"\nprofile = "cpu-x86-int4"\n[update]\nwindow = 0\n', "update.window"),
        ('device_id = "b"\nprofile = "cpu-x86-int4"\n[cloud]\ncert_file = "/x"\n', "cert_file"),
        ('device_id = "b" profile', "TOML"),
        (
            'device_id = "b"\nprofile = "cpu-x86-int4"\n[serving]\nhttp_listen = "8080"\n',
            "serving.http_listen",
        ),
    ],
)
def test_every_mistake_is_a_config_error_naming_the_key(
    tmp_path: Path, key: Path, text: str, where: str
) -> None:
    keys = f'trusted_keys = ["{key}"]\n' if "trusted_keys" not in text else ""
    path = _write(tmp_path, keys + text)
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    assert where in str(err.value)
    assert err.value.exit_code == EXIT_CONFIG == 78


def test_missing_file_and_missing_trusted_key_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml", {})
    path = _write(
        tmp_path, f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrusted_keys = ["{tmp_path / "k.pub"}"]\n'
    )
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path, {})
    path = _write(tmp_path, 'device_id = "b"\nprofile = "cpu-x86-int4"\ntrusted_keys = []\n')
    with pytest.raises(ConfigError, match="trusted_keys"):
        load_config(path, {})


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    from edgeglm.mqtt import backoff_s

    assert backoff_s(0, 1.0, 30.0, rand=lambda: 0.0) == 0.5
    assert backoff_s(0, 1.0, 30.0, rand=lambda: 1.0) == 1.0
    assert backoff_s(3, 1.0, 30.0, rand=lambda: 1.0) == 8.0
    assert backoff_s(10, 1.0, 30.0, rand=lambda: 1.0) == 30.0
    assert backoff_s(10_000, 1.0, 30.0, rand=lambda: 0.0) == 15.0
    import random

    rng = random.Random(1)
    spread = {round(backoff_s(4, 1.0, 30.0, rand=rng.random), 3) for _ in range(50)}
    assert len(spread) > 40 and min(spread) >= 8.0 and max(spread) <= 16.0


def test_trust_root_replaces_fixed_keys_and_must_exist(tmp_path: Path, key: Path) -> None:
    root = tmp_path / "root.json"
    path = _write(tmp_path, f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrust_root = "{root}"\n')
    with pytest.raises(ConfigError, match=r"trust_root .* does not exist"):
        load_config(path, {})
    root.write_text("{}")
    assert load_config(path, {}).trust_root == root
    both = _write(
        tmp_path,
        f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrust_root = "{root}"\ntrusted_keys = ["{key}"]\n',
    )
    with pytest.raises(ConfigError, match="leave trusted_keys and fleet_keys out"):
        load_config(both, {})


def test_http_settings_token_file_is_read_checked_and_never_shown(tmp_path: Path, key: Path) -> None:
    token = tmp_path / "http.token"
    token.write_text("0123456789abcdef0123\n")
    head = f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrusted_keys = ["{key}"]\n'
    path = _write(tmp_path, head + f'[serving]\nhttp_listen = "0.0.0.0:8080"\nhttp_token_file = "{token}"\n')
    c = load_config(path, {"EDGE_AGENT_SERVING_HTTP_ALLOW_REMOTE": "true"})
    assert (c.serving.http_allow_remote, c.serving.http_max_concurrency) == (True, 64)
    assert c.serving.http_token() == "0123456789abcdef0123"
    assert "0123456789abcdef0123" not in repr(c)
    for text in ("short-token", "has a space in it 0123456789", "\n"):
        token.write_text(text)
        with pytest.raises(ConfigError, match=r"serving\.http_token_file") as err:
            load_config(path, {})
        assert text.strip() not in str(err.value) or not text.strip()
    token.unlink()
    with pytest.raises(ConfigError, match=r"serving\.http_token_file"):
        load_config(path, {})
    bad = _write(tmp_path, head + "[serving]\nhttp_max_concurrency = 0\n")
    with pytest.raises(ConfigError, match=r"serving\.http_max_concurrency"):
        load_config(bad, {})


def test_environment_beats_the_file_and_says_so(
    tmp_path: Path, key: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """data_dir from an EDGE_AGENT_* variable wins over agent.toml, and a warning names both values."""
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    path = _write(
        tmp_path,
        f'device_id = "b"\nprofile = "cpu-x86-int4"\ntrusted_keys = ["{key}"]\n'
        f'data_dir = "{tmp_path / "from-file"}"\n[cloud]\nusername = "b"\npassword = "file-secret"\n',
    )
    env = {
        "EDGE_AGENT_DATA_DIR": str(tmp_path / "from-env"),
        "EDGE_AGENT_CLOUD_PASSWORD": "env-secret",
        "EDGE_AGENT_TRUSTED_KEYS": str(key),  # the same value as the file's list: no warning
    }
    with caplog.at_level(logging.WARNING, logger="edge_agent.config"):
        c = load_config(path, env)
    assert c.data_dir == tmp_path / "from-env"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    data_line = next(w for w in warnings if w.startswith("config data_dir:"))
    assert data_line == (
        f"config data_dir: EDGE_AGENT_DATA_DIR={str(tmp_path / 'from-env')!r} overrides "
        f"{str(tmp_path / 'from-file')!r} from {path}"
    )
    pw_line = next(w for w in warnings if w.startswith("config cloud.password:"))
    assert "(hidden)" in pw_line and "secret" not in pw_line.replace("EDGE_AGENT_CLOUD_PASSWORD", "")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_agent.config"):
        same = load_config(path, {"EDGE_AGENT_DATA_DIR": str(tmp_path / "from-file")})
    assert same.data_dir == tmp_path / "from-file" and not caplog.records


def test_status_of_an_empty_box_names_no_slot_and_creates_nothing(tmp_path: Path, key: Path) -> None:
    from edge_agent.entry import box_status
    from edge_agent.update.slots import Slots

    data = tmp_path / "data"
    path = _write(
        tmp_path,
        f'device_id = "b"\nprofile = "cpu-x86-int8"\ntrusted_keys = ["{key}"]\ndata_dir = "{data}"\n',
    )
    config = load_config(path, {})
    empty = {"device_id": "b", "active_slot": None, "slot_a": None, "slot_b": None, "last_update": None}
    assert box_status(config) == empty
    assert not data.exists()  # status is read-only: a box never set up stays so
    Slots(data)  # what the daemon's first start lays out: current -> slots/a, both slots empty
    assert (data / "current").is_symlink()
    assert box_status(config) == empty  # an active slot that holds no model serves nothing
