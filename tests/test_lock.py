"""requirements.lock against pyproject.toml and runs/setup_env.sh (they must agree, or runs/lock.sh is due), and
the environment the tests run in against the lock (set-up installs exactly it)."""

import os
import re
from importlib import metadata

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# torch comes per machine from runs/setup_env.sh; what only its CUDA builds pull in is pinned by the torch wheel
NOT_LOCKED = re.compile(r"^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$")


def read_lock():
    """{name: [Requirement]}: every pin of the lock, with its environment marker."""
    pins = {}
    with open(os.path.join(REPO, "requirements.lock")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                req = Requirement(line)
                assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
                pins.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def pinned_version(pins, name, env=None):
    """The version the lock pins for `name` in this environment (or `env`), None if none applies."""
    hits = [r for r in pins.get(canonicalize_name(name), []) if r.marker is None or r.marker.evaluate(env)]
    assert len(hits) <= 1, f"{name}: several pins apply at once: {hits}"
    return Version(next(iter(hits[0].specifier)).version) if hits else None


def project_requirements():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    reqs = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in project["project"]["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def setup_torch_versions():
    text = open(os.path.join(REPO, "runs", "setup_env.sh")).read()
    get = lambda var: re.search(rf'^{var}="\$\{{\w+:-([^}}]+)\}}"$', text, re.M).group(1)  # noqa: E731
    return get("CUDA_TORCH_VERSION"), get("CPU_TORCH_VERSION"), re.search(r'^MIN_TORCH="([\d.]+)"', text, re.M).group(1)


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_every_pyproject_requirement_is_pinned_within_its_range(python, platform):
    pins = read_lock()
    env = dict(default_environment(), python_version=python, python_full_version=python + ".0", sys_platform=platform)
    for req in project_requirements():
        if NOT_LOCKED.match(canonicalize_name(req.name)):
            continue
        version = pinned_version(pins, req.name, env)
        assert version is not None, f"{req.name} is in pyproject.toml but not in requirements.lock: run runs/lock.sh"
        assert req.specifier.contains(version, prereleases=True), \
            f"pyproject.toml wants {req}, requirements.lock pins {version}: run runs/lock.sh"


def test_torch_pins_satisfy_pyproject():
    torch_req = next(r for r in project_requirements() if r.name == "torch")
    cuda, cpu, floor = setup_torch_versions()
    for v in (cuda, cpu):
        assert torch_req.specifier.contains(v), f"runs/setup_env.sh pins torch {v} outside pyproject's {torch_req}"
    below = f"{floor.split('.')[0]}.{int(floor.split('.')[1]) - 1}.99"
    assert torch_req.specifier.contains(floor + ".0") and not torch_req.specifier.contains(below), \
        f"setup_env.sh MIN_TORCH={floor} must be the floor of pyproject's {torch_req}"
    assert "torch" not in read_lock()


def test_gpu_extra_pins_a_tested_kernels_range():
    kernels = next(r for r in project_requirements() if r.name == "kernels")
    assert kernels.specifier.contains("0.19.1") and not kernels.specifier.contains("0.20.0"), kernels
    assert kernels.specifier.contains(str(pinned_version(read_lock(), "kernels")))


def dependency_closure(root, extras):
    """Installed distributions reached from `root` with `extras`, by walking installed metadata."""
    seen, todo = {}, [(root, tuple(extras))]
    while todo:
        name, want = todo.pop()
        key = canonicalize_name(name)
        if key in seen and set(want) <= seen[key][1]:
            continue
        dist = metadata.distribution(name)
        seen[key] = (dist.version, set(want) | seen.get(key, (None, set()))[1])
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in want] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                todo.append((req.name, tuple(req.extras)))
    return {k: v for k, (v, _) in seen.items()}


def test_this_environment_is_what_the_lock_pins():
    try:
        metadata.distribution("nanochat")
    except metadata.PackageNotFoundError:
        pytest.skip("nanochat is not installed in this environment (runs/setup_env.sh installs it)")
    pins = read_lock()
    installed = dependency_closure("nanochat", ["dev", "export"])
    mismatched = {}
    for name, version in installed.items():
        if name == "nanochat" or NOT_LOCKED.match(name):
            continue
        pin = pinned_version(pins, name)
        if pin is None or Version(version) != pin:
            mismatched[name] = (version, pin)
    assert not mismatched, (f"installed (version, locked version) differ: {mismatched}; rerun runs/setup_env.sh, "
                            "or runs/lock.sh if pyproject.toml changed")
