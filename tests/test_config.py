"""Config loading: the documented default parses, and every bad value names its file, key and problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cachingproxy.config import CacheRule, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"s3": {"bucket": "b"}}


def test_repo_config_toml_is_valid_and_documents_the_defaults() -> None:
    config = load_config(ROOT / "config.toml")
    defaults = parse_config(MINIMAL)
    assert config.server == defaults.server
    assert config.cache.ttl == defaults.cache.ttl
    assert config.cache.index_document == "index.html"
    assert config.s3.endpoint_url == ""
    assert config.compression == defaults.compression


def test_every_key_in_the_dataclasses_is_documented_in_config_toml() -> None:
    text = (ROOT / "config.toml").read_text()
    config = parse_config(MINIMAL)
    for section in ("server", "s3", "cache", "admin", "events", "compression"):
        for name in type(getattr(config, section)).__dataclass_fields__:
            assert f"{name} =" in text or f"# {name} =" in text or name == "rules", f"{section}.{name}"


def test_rules_parse_in_order() -> None:
    config = parse_config({"s3": {"bucket": "b"},
                           "cache": {"rules": [{"match": "_static/**", "ttl": 3600}, {"match": "*", "ttl": 1}]}})
    assert config.cache.rules == (CacheRule("_static/**", 3600.0), CacheRule("*", 1.0))


def test_rules_set_ttl_and_client_cache_control_independently() -> None:
    rules = [{"match": "_static/**", "client_cache_control": "max-age=31536000, immutable", "override": True},
             {"match": "**", "ttl": 5}]
    config = parse_config({"s3": {"bucket": "b"}, "cache": {"rules": rules}})
    assert config.cache.rules == (CacheRule("_static/**", None, "max-age=31536000, immutable", True),
                                  CacheRule("**", 5.0))
    assert config.cache.client_cache_control == "no-cache"


def test_mount_is_normalised() -> None:
    assert parse_config({"s3": {"bucket": "b"}, "server": {"mount": "/docs/"}}).server.mount == "/docs"
    assert parse_config({"s3": {"bucket": "b"}, "server": {"mount": "/"}}).server.mount == ""


@pytest.mark.parametrize(("data", "message"), [
    pytest.param({}, "test.toml: s3.bucket: is required", id="bucket-required"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"ttl": -1}}, "test.toml: cache.ttl: must be >= 0", id="ttl"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"ttl": "5"}}, "test.toml: cache.ttl: must be float", id="type"),
    pytest.param({"s3": {"bucket": "b"}, "server": {"port": True}}, "server.port: must be int", id="bool-not-int"),
    pytest.param({"s3": {"bucket": "b"}, "server": {"port": 70000}}, "server.port: must be 1-65535", id="port"),
    pytest.param({"s3": {"bucket": "b", "secret_access_key": "x"}}, "s3.secret_access_key: unknown key",
                 id="credentials-never-in-config"),
    pytest.param({"s3": {"bucket": "b"}, "server": {"mount": "docs"}}, "server.mount: must start with '/'",
                 id="mount"),
    pytest.param({"s3": {"bucket": "b", "addressing_style": "x"}}, "s3.addressing_style", id="addressing"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"rules": [{"match": "", "ttl": 1}]}},
                 "cache.rules[0].match", id="rule-match"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"rules": [{"match": "x", "ttl": -1}]}},
                 "cache.rules[0].ttl", id="rule-ttl"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"rules": [{"match": "x"}]}},
                 "cache.rules[0]: sets neither ttl nor client_cache_control", id="rule-empty"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"rules": [{"match": "x", "ttl": 1, "override": True}]}},
                 "cache.rules[0].override: needs client_cache_control", id="rule-override-alone"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"rules": [{"match": "x", "client_cache_control": "a\r\nX: y"}]}},
                 "cache.rules[0].client_cache_control", id="rule-cc-injection"),
    pytest.param({"s3": {"bucket": "b"}, "cache": {"client_cache_control": " "}}, "cache.client_cache_control",
                 id="client-cc-empty"),
    pytest.param({"s3": {"bucket": "b"}, "extra": {}}, "extra: unknown section", id="section"),
    pytest.param({"s3": {"bucket": "b"}, "events": {"wait_seconds": 21}}, "events.wait_seconds: must be 0-20",
                 id="events-long-poll-limit"),
    pytest.param({"s3": {"bucket": "b"}, "events": {"fallback_ttl": -1}}, "events.fallback_ttl: must be >= 0",
                 id="events-fallback-ttl"),
    pytest.param({"s3": {"bucket": "b"}, "events": {"queue_url": "docs-office"}}, "events.queue_url",
                 id="events-queue-url-is-a-url"),
    pytest.param({"s3": {"bucket": "b"}, "events": {"refresh": "yes"}}, "events.refresh: must be bool",
                 id="events-refresh-bool"),
    pytest.param({"s3": {"bucket": "b"}, "events": {"queue": "x"}}, "events.queue: unknown key",
                 id="events-unknown-key"),
])
def test_invalid_config_names_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(None, "missing.toml: file not found", id="missing"),
    pytest.param("[s3\nbucket=", "invalid TOML", id="syntax"),
    pytest.param("[s3]\nbucket = 'b'\n[cache]\nttl = -5\n", "cache.ttl: must be >= 0", id="value"),
])
def test_cli_exits_nonzero_with_one_line(tmp_path: Path, content: str | None, expected: str) -> None:
    path = tmp_path / "missing.toml"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "cachingproxy", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0]


def test_client_cache_control_is_per_site() -> None:
    site_a = {"name": "a", "hosts": ["a.example"], "cache": {"client_cache_control": "max-age=60"}}
    config = parse_config({"s3": {"bucket": "b"}, "cache": {"client_cache_control": "no-cache"},
                           "sites": [site_a, {"name": "b", "hosts": ["b.example"]}]})
    assert [site.cache.client_cache_control for site in config.sites] == ["max-age=60", "no-cache"]
    with pytest.raises(ConfigError, match=r"sites\.a\.cache\.client_cache_control"):
        parse_config({"s3": {"bucket": "b"}, "sites": [{"name": "a", "cache": {"client_cache_control": "a\nb"}}]})


@pytest.mark.parametrize(("compression", "problem"), [
    ({"min_size": -1}, "compression.min_size: must be >= 0"),
    ({"types": "text/css"}, "compression.types: must be an array of strings"),
    ({"types": ["Text/CSS"]}, "compression.types: must be lower-case media types"),
    ({"types": ["css"]}, "compression.types: must be lower-case media types"),
    ({"level": 5}, "compression.level: unknown key"),
    ({"enabled": "yes"}, "compression.enabled: must be bool"),
])
def test_compression_errors_name_their_key(compression: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.").replace("(", r"\(")):
        parse_config({**MINIMAL, "compression": compression})


def test_compression_types_replace_the_default_list() -> None:
    config = parse_config({**MINIMAL, "compression": {"types": ["text/css"], "min_size": 0}})
    assert (config.compression.types, config.compression.min_size) == (("text/css",), 0)
