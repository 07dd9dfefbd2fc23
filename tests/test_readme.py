"""The README, true line by line: what it names exists, what it tells you to type works, what it says holds.

Files and make targets it names exist; nothing points outside the repository; its configuration table is the
config's keys; the `cachingproxy` command lines it shows parse; its admin API curl lines work against a proxy;
and which responses carry the cache headers is as it says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cachingproxy.config import Config

from .conftest import Bucket, MakeProxy
from .shim import Shim

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CODE_BLOCKS = re.findall(r"^```[a-z]*\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
TOKEN = "t0ken"

# Named in the README but not files of this repository: the cache's, the demo's, a build's output, S3 keys.
RUNTIME_FILES = {"cache.db", "demo-cache/config.toml", "dist/cachingproxy-0.1.0-py3-none-any.whl", "dir/",
                 "dir/index.html", "index.html", "café menu.html", "guides/a b+c/ü.html",
                 "guides/", "guides/index.html", "guides%2Findex.html"}  # the last: S3 keys in examples
# Where a bare file name the README uses (a module in the layout table, a test, a results file) lives.
SEARCHED = ("", "cachingproxy", "tests", "benchmarks", "benchmarks/results", "docs")


def named_files() -> set[str]:
    names = set()
    for quoted in re.findall(r"`([^`\n]+)`", README) + re.findall(r"\]\(([^)\s]+)\)", README):
        if quoted in RUNTIME_FILES:
            continue
        for word in quoted.split():
            if word.startswith(("/", "http", "<", "{", "$")) or "{" in word:
                continue  # URL paths and placeholders
            if re.search(r"\.(py|md|toml|sh|png|html|lua|txt|whl|db)$", word) or word.endswith("/"):
                names.add(word)
    return names - RUNTIME_FILES


@pytest.mark.parametrize("name", sorted(named_files()))
def test_every_file_the_readme_names_exists(name: str) -> None:
    assert not name.startswith("../"), "the README must not point outside the repository"
    if "/" in name.rstrip("/"):
        assert (ROOT / name).exists(), name
    else:
        assert any((ROOT / where / name).exists() for where in SEARCHED), name


def test_no_document_points_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in tracked.split():
        path = ROOT / name
        if name == "tests/test_readme.py":  # this file names them to look for them
            continue
        if path.suffix in {".py", ".md", ".toml", ".sh", ".html", ".cfg", ".txt"} or name in {"Makefile", ".ci/run"}:
            text = path.read_text(encoding="utf-8", errors="replace")
            if "../shared" in text or "RELIABILITY.md" in text or "DESIGN.md" in text:
                offenders.append(name)
    assert offenders == [], "cite docs/reliability.md, which is in the repository"


def test_every_make_target_the_readme_names_exists_and_resolves() -> None:
    targets = set(re.findall(r"`make (\w+)", README))
    for block in CODE_BLOCKS:
        targets.update(re.findall(r"^(?:\$ )?make (\w+)", block, flags=re.MULTILINE))
    assert {"demo", "test", "bench", "dist"} <= targets
    for target in sorted(targets):
        # -n: print the commands without running them (offline, instant), but fail on an unknown target.
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, (target, dry.stderr)


def test_the_configuration_table_is_the_configs_keys() -> None:
    listed = set()
    key = r"`((?:server|s3|cache|admin|compression)\.(?!py`)[a-z_]+)`"
    for row in re.findall(rf"^\| {key}(?:, {key})? \|", README, flags=re.MULTILINE):
        listed.update(key for key in row if key)
    if "`[[cache.rules]]` `match`, `ttl`" in README:
        listed.add("cache.rules")
    actual = {f"{section.name}.{key.name}" for section in dataclasses.fields(Config)
              if section.name in ("server", "s3", "cache", "admin", "compression")  # [[sites]]: its own table
              for key in dataclasses.fields(section.default_factory())}  # type: ignore[misc]
    assert listed == actual


def test_durations_agree_between_the_readme_and_the_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    bench_make = re.search(r"runs for about (\d+) minutes", makefile)
    bench_readme = re.search(r"About (\d+) minutes \((\d+) s for the run below\)", README)
    assert bench_make and bench_readme and bench_make[1] == bench_readme[1]
    command = (ROOT / "benchmarks/results/latest.md").read_text().partition("Command: ")[2].partition("\n")[0]
    assert f"({bench_readme[2]} s)" in command, command  # the run the README quotes is the one on file
    assert re.search(r"make test .*\(about \d+ minutes", README), "the README says how long make test takes"


def command_lines(program: str) -> list[str]:
    lines = []
    for block in CODE_BLOCKS:
        joined = block.replace("\\\n", " ")
        lines += [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith(program)]
    return lines


def test_the_cachingproxy_command_lines_parse() -> None:
    lines = command_lines("cachingproxy ")
    assert any(line.startswith("cachingproxy warm") for line in lines)
    for line in lines:
        command = line.split()[1]
        asked = ["--help"] if command.startswith("-") else [command, "--help"]
        helped = subprocess.run([sys.executable, "-m", "cachingproxy", *asked], capture_output=True, text=True,
                                timeout=60)
        assert helped.returncode == 0, line
        for flag in re.findall(r"--[a-z][a-z-]*", line):
            assert flag in helped.stdout, (line, flag)
    version = subprocess.run([sys.executable, "-m", "cachingproxy", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.stdout.startswith("cachingproxy ")


async def test_the_admin_curl_lines_work_as_written(make_proxy: MakeProxy, bucket: Bucket, shim: Shim) -> None:
    bucket.put("guides/a.html", b"a")
    proxy = await make_proxy(admin={"token": TOKEN})
    lines = [line for line in command_lines("curl ") if "$CACHINGPROXY_ADMIN_TOKEN" in line]
    assert [line.rsplit("/", 1)[1] for line in lines] == ["warm", "stats", "purge"]
    env = {**os.environ, "CACHINGPROXY_ADMIN_TOKEN": TOKEN}
    for line in lines:
        command = line.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{proxy.port}") + " --fail --silent"
        curl = await asyncio.create_subprocess_shell(command, env=env, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(curl.communicate(), 60)
        assert curl.returncode == 0, (line, out, err)
        assert out.startswith(b"{"), out


async def test_which_responses_carry_the_cache_headers_is_what_the_readme_says(
        make_proxy: MakeProxy, bucket: Bucket, shim: Shim, tmp_path: Path) -> None:
    etag = bucket.put("a.html", b"0123456789")
    bucket.put("folder/index.html", b"folder")
    bucket.put("404.html", b"missing")

    async def outcome(method: str, path: str, **headers: str) -> tuple[int, str]:
        resp = await client.request(method, path, headers=headers, allow_redirects=False)
        carried = {"X-Cache", "Age", "Cache-Status"} & resp.headers.keys()
        if carried == {"Cache-Status"}:
            assert resp.headers["Cache-Status"] == "cachingproxy; fwd=uri-miss; fwd-status=404"
            return resp.status, "Cache-Status"
        assert carried in (set(), {"X-Cache", "Age", "Cache-Status"}), resp.headers
        return resp.status, "all" if carried else "none"

    client = await make_proxy()
    assert await outcome("GET", "/docs/a.html") == (200, "all")
    assert await outcome("GET", "/docs/a.html", Range="bytes=0-1") == (206, "all")
    assert await outcome("GET", "/docs/a.html", **{"If-None-Match": etag}) == (304, "all")
    assert await outcome("GET", "/docs/a.html", **{"If-Match": '"other"'}) == (412, "all")
    assert await outcome("GET", "/docs/a.html", Range="bytes=50-") == (416, "all")
    assert await outcome("GET", "/docs/folder") == (301, "none")
    assert await outcome("GET", "/docs/a%5Cb") == (400, "none")  # a backslash
    resp = await client.post("/docs/a.html")
    assert (resp.status, resp.headers["Allow"], "X-Cache" in resp.headers) == (405, "GET, HEAD", False)
    assert "`405` with `Allow: GET, HEAD`" in README
    assert await outcome("GET", "/docs/missing.html") == (404, "Cache-Status")
    client = await make_proxy(cache={"error_document": "404.html", "directory": str(tmp_path / "other")})
    assert await outcome("GET", "/docs/missing.html") == (404, "Cache-Status")  # with the error document
    await shim.refuse()
    assert await outcome("GET", "/docs/cold.html") == (502, "none")
