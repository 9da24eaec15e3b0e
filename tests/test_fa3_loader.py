"""
The Flash Attention 3 loader (nanochat/attention.py) against the real `kernels` package, offline: a stand-in
kernel repository in a temporary kernel cache (the Hub cache layout `kernels` reads: snapshots by commit, refs
by version), two versions of it, sockets blocked. The loader must find the pinned version (or the commit a
kernels.lock pins) with no network, say where it came from, and on a Hopper GPU without it say so in one line.
"""

import hashlib
import json
import logging
import os
import socket

import pytest
import torch

import nanochat.attention as attn

pytest.importorskip("kernels")
REPO = attn.FA3_KERNEL_REPO


def add_build(cache, version, tag):
    """A stand-in FA3 build of `version`, as set-up leaves it in the cache; its module says MARK = tag.
    Returns its commit. Builds for CPU and CUDA (noarch), so it resolves on any test machine."""
    commit = hashlib.sha1(f"{cache}{version}{tag}".encode()).hexdigest()
    repo = os.path.join(cache, "kernels--" + REPO.replace("/", "--"))
    for variant in ("torch-cpu", "torch-cuda"):
        build = os.path.join(repo, "snapshots", commit, "build", variant)
        os.makedirs(os.path.join(build, "flash_attn3"))
        with open(os.path.join(build, "metadata.json"), "w") as f:  # kernel ids must be unique per build
            json.dump({"id": f"_fa3_standin_{commit[:12]}_{variant.replace('-', '_')}", "name": "flash-attn3",
                       "version": version, "license": "bsd-3-clause", "python-depends": [],
                       "backend": {"type": variant.split("-")[1]}}, f)
        with open(os.path.join(build, "flash_attn3", "__init__.py"), "w") as f:
            f.write(f"MARK = {tag!r}\n\ndef flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):\n"
                    "    return q\n")
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", f"v{version}"), "w") as f:
        f.write(commit)
    return commit


def write_lock(path, commit):
    with open(path, "w") as f:
        json.dump([{"dependency": {"repo-id": REPO, "version": attn.FA3_KERNEL_VERSION}, "lock": {"commit": commit}}], f)
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache and no network: any connection attempt fails the test."""
    d = str(tmp_path / "kernels-cache")
    os.makedirs(d)
    monkeypatch.setenv("KERNELS_CACHE", d)

    def no_network(*args, **kwargs):
        raise AssertionError("the FA3 loader touched the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    yield d
    attn._backend = attn._fa3 = None


@pytest.fixture
def hopper(monkeypatch):
    """This process believes it runs on an H100 (compute capability 9.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_loads_the_pinned_version_from_the_cache_offline(cache, tmp_path):
    from huggingface_hub import constants
    offline_before = constants.HF_HUB_OFFLINE
    add_build(cache, 1, "v1")
    add_build(cache, 2, "v2")  # a newer major version in the cache must not be picked
    mod, where = attn.load_fa3_kernel(lockfile=str(tmp_path / "no.lock"))
    assert mod.MARK == "v1"
    assert REPO in where and f"version {attn.FA3_KERNEL_VERSION}" in where
    assert constants.HF_HUB_OFFLINE == offline_before  # the offline switch is restored


def test_kernels_lock_pins_the_exact_build(cache, tmp_path):
    add_build(cache, 1, "v1 as first fetched")
    pinned = add_build(cache, 1, "v1 at the locked commit")  # refs/v1 now names this one; lock the other instead
    first = hashlib.sha1(f"{cache}1v1 as first fetched".encode()).hexdigest()
    mod, where = attn.load_fa3_kernel(lockfile=write_lock(tmp_path / "kernels.lock", first))
    assert mod.MARK == "v1 as first fetched" and "kernels.lock" in where
    mod, _ = attn.load_fa3_kernel(lockfile=write_lock(tmp_path / "kernels.lock", pinned))
    assert mod.MARK == "v1 at the locked commit"


def test_hopper_with_the_kernel_picks_fa3_and_says_why(cache, hopper, tmp_path, monkeypatch):
    add_build(cache, 1, "v1")
    monkeypatch.setattr(attn, "KERNELS_LOCK", str(tmp_path / "no.lock"))
    assert attn.set_backend(None) == "fa3"
    assert attn._fa3.MARK == "v1"
    assert "Hopper GPU" in attn.backend_reason() and REPO in attn.backend_reason()


def test_hopper_without_the_kernel_warns_once_with_reason_and_fix(cache, hopper, caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(attn, "KERNELS_LOCK", str(tmp_path / "no.lock"))
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        backend = attn.set_backend(None)
    assert backend == "flex"  # CUDA without FA3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "nanochat"]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    line = warnings[0]
    assert line.startswith("WARNING: Flash Attention 3 is not in use on this Hopper GPU")
    assert REPO in line and "did not load" in line  # the reason
    assert "Fix: " in line and "runs/setup_env.sh" in line and "KERNELS_CACHE" in line
    assert REPO in attn.backend_reason()  # the reason also travels with the backend into logs and the report
    with pytest.raises(RuntimeError, match="'fa3' cannot run here"):
        attn.set_backend("fa3")


def test_hopper_without_the_kernels_package(cache, hopper, caplog, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "kernels", None)  # import kernels -> ImportError
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert attn.set_backend(None) == "flex"
    assert "`kernels` package is not installed" in caplog.text and "pip install -e '.[gpu]'" in caplog.text


def test_not_hopper_is_silent(cache, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100: no FA3, nothing to fix
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        assert attn.set_backend(None) == "flex"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "not Hopper" in attn.backend_reason()


def test_pyproject_pins_the_same_kernel_version():
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["tool"]["kernels"]["dependencies"] == {REPO: attn.FA3_KERNEL_VERSION}
    lock = os.path.join(root, "kernels.lock")
    if os.path.exists(lock):  # `kernels lock .` output must match its input
        with open(lock) as f:
            deps = {e["dependency"]["repo-id"]: e["dependency"]["version"] for e in json.load(f)}
        assert deps == project["tool"]["kernels"]["dependencies"]
