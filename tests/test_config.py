"""The config schema: sizes, defaults, validation messages that name the key."""

import subprocess
import sys

import pytest

from kvtierd.config import ConfigError, describe, load, parse_size

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), (4096, 4096), ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1.5G", 1_500_000_000),
    ("64 KiB", 64 << 10), ("2TiB", 2 << 40), ("0", 0),
])
def test_sizes_accept_bytes_and_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "-5", "", "GiB", True, 1.5, [1]])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_shipped_default_config_loads_and_equals_builtin_defaults():
    shipped = load(ROOT / "configs" / "kvtierd.toml")
    builtin = load(None)
    assert shipped == builtin


def test_shipped_config_documents_every_key():
    text = (ROOT / "configs" / "kvtierd.toml").read_text()
    for key, _default, _doc, _live in describe():
        section, name = key.split(".")
        assert f"[{section}]" in text
        assert f"\n{name} =" in text or f"\n# {name} =" in text, f"{key} missing from configs/kvtierd.toml"


def test_toml_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[host]\nbytes = "256MiB"\n[disk]\ndurability = "never"\n')
    cfg = load(f, {"host.bytes": "128MiB"})
    assert cfg.host.bytes == 128 << 20
    assert cfg.disk.durability == "never"


@pytest.mark.parametrize("overrides,needle", [
    ({"host.bytes": "lots"}, "host.bytes"),
    ({"host.high_watermark": "1.5"}, "host.high_watermark"),
    ({"disk.durability": "sometimes"}, "disk.durability"),
    ({"host.low_watermark": 0.99, "host.high_watermark": 0.5}, "host.low_watermark"),
    ({"nosuch.key": 1}, "unknown section"),
    ({"host.nosuch": 1}, "unknown key"),
    ({"metrics.address": "nowhere"}, "metrics.address"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load(None, overrides)
    assert needle in str(e.value)


def test_bad_toml_is_reported(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[host\nbytes=")
    with pytest.raises(ConfigError, match="c.toml"):
        load(f)


def test_serve_with_bad_value_exits_with_a_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvtierd", "serve", "--socket", str(tmp_path / "s"),
                        "--host-bytes", "lots"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "host.bytes" in r.stderr


def test_defaults_work_without_root_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("KVTIERD_SOCKET", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    cfg = load(None)
    if __import__("os").geteuid() != 0:
        assert cfg.server.socket.startswith(str(tmp_path))
        assert cfg.state.dir.startswith(str(tmp_path))
    assert cfg.server.socket.endswith("kvtierd.sock")


def test_readme_config_reference_is_current():
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.table() in (ROOT / "README.md").read_text(), "run scripts/config_reference.py"
