"""The GPU and set-up shell scripts, checked without a GPU: syntax; runs/gpu_check.sh's dry run, step limits
(7.5 minutes in all) and timeouts; runs/setup_env.sh's plan (reusing a fitting torch offline, the venv fallback)
and its offline install; every flag speedrun.sh and gpu_check.sh pass to a script exists in its argparse."""

import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_SCRIPTS = ["speedrun.sh", "runs/gpu_check.sh", "runs/setup_env.sh", "runs/wheelhouse.sh", "runs/lock.sh",
                 "runs/check_offline_install.sh", "runs/runcpu.sh"]


@pytest.mark.parametrize("path", SHELL_SCRIPTS)
def test_shell_syntax(path):
    subprocess.run(["bash", "-n", os.path.join(REPO, path)], check=True)


def invocations(path):
    """(module, [flags]) for every `-m scripts.X ...` command in a shell script (continuation lines joined)."""
    text = open(os.path.join(REPO, path)).read().replace("\\\n", " ")
    for name, value in re.findall(r'^(\w+)="([^"$]*)"$', text, flags=re.M):  # expand plain VAR="--flags"
        text = text.replace("$" + name + " ", value + " ")
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"-m (scripts\.\w+)(.*)", line):
            flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])(?=[=\s]|$)", m.group(2))
            out.append((m.group(1), flags))
    return out


@pytest.mark.parametrize("path", ["speedrun.sh", "runs/gpu_check.sh"])
def test_every_flag_exists_in_the_scripts_argparse(path):
    calls = invocations(path)
    assert calls, f"no script invocations found in {path}"
    for module, flags in calls:
        src = open(os.path.join(REPO, *module.split(".")) + ".py").read()
        declared = set(re.findall(r'add_argument\(\s*"(-[-\w]+)"(?:,\s*"(--[-\w]+)")?', src))
        names = {n for pair in declared for n in pair if n}
        if "add_mixture_args" in src:
            names |= {"--mix", "--val-mix", "--drop", "--add-data", "--cap"}
        for flag in flags:
            if flag == "--":
                continue
            assert flag in names, f"{path}: {module} has no flag {flag}"


def gpu_check(tmp_path, **env):
    env = dict(os.environ, GPU_CHECK_DIR=str(tmp_path / "logs"), **env)
    return subprocess.run(["bash", "runs/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


STAGES = ["env", "pytest-gpu", "bench-train-bf16", "bench-train-fp8", "bench-infer", "e2e-data", "e2e-tok_train",
          "e2e-base_train", "e2e-chat_sft", "e2e-chat"]


def test_gpu_check_dry_run_prints_every_stage_within_eight_minutes(tmp_path):
    out = gpu_check(tmp_path, GPU_CHECK_DRY="1")
    assert out.returncode == 0, out.stderr
    limits = dict(re.findall(r"^=== \[([\w-]+)\] \(limit ([\d.]+)s\)", out.stdout, re.M))
    assert list(limits) == STAGES
    grace = int(re.search(r"^KILL_GRACE=(\d+)", open(os.path.join(REPO, "runs/gpu_check.sh")).read(), re.M).group(1))
    # worst case: every step runs to its limit, then to its kill
    assert sum(float(v) for v in limits.values()) + grace * len(limits) <= 7.5 * 60
    assert "GPU CHECK SUMMARY" in out.stdout and "(dry run" in out.stdout
    assert "--device-batch-size=auto" in out.stdout and "--fp8" in out.stdout


def test_gpu_check_reports_timed_out_steps_and_always_prints_the_summary(tmp_path):
    # every limit scaled to a fraction of a second: each step is killed, reported, and the run still ends with
    # the summary and a failing exit status, promptly
    t0 = time.time()
    out = gpu_check(tmp_path, GPU_CHECK_E2E_ONLY="1", GPU_CHECK_E2E_BATCH="2", GPU_CHECK_LIMIT_SCALE="0.02")
    assert time.time() - t0 < 60
    assert out.returncode != 0
    summary = out.stdout[out.stdout.index("GPU CHECK SUMMARY"):]
    for stage in STAGES[5:]:
        assert re.search(rf"^  {stage}: +TIMED OUT \(limit [\d.]+s\) in \d+s$", summary, re.M), (stage, summary)
    assert "SOME STEPS FAILED OR TIMED OUT" in summary


def test_bench_train_reports_compile_time_apart(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scripts.bench_train", "--depth=1", "--head-dim=32", "--max-seq-len=32",
                          "--device-batch-size=2", "--vocab-size=256", "--steps=1", "--warmup-steps=2", "--baseline=0",
                          "--compile=0", "--dtype=float32"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"float32 eager: compile \+ first step [\d.]+ s, 1 more warm-up steps in [\d.]+ s", out.stdout)


def test_bench_serve_stops_at_once_when_its_server_cannot_start(tmp_path):
    # no tokenizer and no pretraining text for the random model: the server process exits, and the benchmark
    # says why and stops instead of waiting for a server that will never report
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "scripts.bench_serve", "--repeats=1", "--clients=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_DATA_DIR=str(tmp_path)))
    assert out.returncode != 0
    assert "the batch server cannot start" in out.stderr and "NANOCHAT_DATA_DIR" in out.stderr
    assert "exited (code 2) before serving" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.time() - t0 < 60


def fake_python(tmp_path, torch_version=None, cuda=None, venv_works=True):
    """A `python3` for set-up: the base interpreter of this one (a system python, not a venv), optionally seeing a
    stand-in torch of this version (a CUDA build when `cuda` is set), optionally without a working venv module
    (no python3-venv)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    lines = ["#!/usr/bin/env bash"]
    if torch_version:
        site = tmp_path / "site"
        (site / "torch").mkdir(parents=True)
        (site / "torch" / "__init__.py").write_text(
            f"__version__ = {torch_version!r}\nclass version:\n    cuda = {cuda!r}\n")
        lines.append(f"export PYTHONPATH={site}")
    if not venv_works:
        lines.append('if [ "$1 $2" = "-m venv" ] && [[ " $* " != *" --without-pip "* ]]; then exit 1; fi')
    lines.append(f'exec {getattr(sys, "_base_executable", sys.executable)} "$@"')
    (bin_dir / "python3").write_text("\n".join(lines) + "\n")
    (bin_dir / "python3").chmod(0o755)
    return str(bin_dir / "python3")


def setup_plan(tmp_path, python, gpu=False, **env):
    """runs/setup_env.sh's dry run (prints what it would do, changes nothing); gpu: nvidia-smi says there is one."""
    path = os.environ["PATH"]
    if gpu:
        (tmp_path / "gpubin").mkdir(exist_ok=True)
        (tmp_path / "gpubin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
        (tmp_path / "gpubin" / "nvidia-smi").chmod(0o755)
        path = f"{tmp_path / 'gpubin'}:{path}"
    env = dict(os.environ, PATH=path, NANOCHAT_SETUP_DRY="1", NANOCHAT_PYTHON=python,
               NANOCHAT_VENV=str(tmp_path / "venv"), **env)
    out = subprocess.run(["bash", "runs/setup_env.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (tmp_path / "venv").exists()  # a dry run changes nothing
    return out.stdout


def test_setup_offline_reuses_an_installed_cuda_torch_that_fits(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    py = fake_python(tmp_path, "2.9.1+cu128", cuda="12.8")
    plan = setup_plan(tmp_path, py, gpu=True, NANOCHAT_WHEELHOUSE=str(wheels))
    assert "reusing the installed torch 2.9.1+cu128 (CUDA 12.8)" in plan and "system site packages" in plan
    assert "--no-index" in plan and str(wheels) in plan and "-c requirements.lock" in plan
    assert "install -c requirements.lock --no-index --find-links" in plan and "torch==" not in plan
    assert ".[dev,export,gpu]" in plan


@pytest.mark.parametrize("version,cuda,gpu", [("2.8.0+cu128", "12.8", True),   # too old
                                              ("2.10.0+cpu", None, True)])      # a CPU build on a GPU node
def test_setup_offline_installs_torch_when_the_installed_one_does_not_fit(tmp_path, version, cuda, gpu):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    plan = setup_plan(tmp_path, fake_python(tmp_path, version, cuda=cuda), gpu=gpu, NANOCHAT_WHEELHOUSE=str(wheels))
    assert "reusing" not in plan and "installing torch==2.9.1" in plan
    assert "torch==2.9.1 --index-url" not in plan  # offline: from the wheelhouse, never PyTorch's index


def test_setup_online_pins_torch_per_machine(tmp_path):
    py = fake_python(tmp_path, "2.9.1+cu128", cuda="12.8")  # online, an installed torch is not reused
    assert "torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128" in setup_plan(tmp_path, py, gpu=True)
    plan = setup_plan(tmp_path, py)
    assert "installing torch==2.13.0" in plan and "-c requirements.lock" in plan and ".[dev,export]" in plan


def test_setup_rejects_a_missing_wheelhouse_and_an_old_python(tmp_path):
    env = dict(os.environ, NANOCHAT_SETUP_DRY="1", NANOCHAT_VENV=str(tmp_path / "v"))
    out = subprocess.run(["bash", "runs/setup_env.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(env, NANOCHAT_WHEELHOUSE=str(tmp_path / "nope")))
    assert out.returncode == 1 and "is not a directory (make one with runs/wheelhouse.sh)" in out.stdout
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")
    old.chmod(0o755)
    out = subprocess.run(["bash", "runs/setup_env.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(env, NANOCHAT_PYTHON=str(old)))
    assert out.returncode == 1 and "older than Python 3.10" in out.stdout


def test_setup_without_python3_venv_falls_back_and_says_which(tmp_path):
    # the real thing, not a plan: a venv from an interpreter whose `-m venv` fails (no python3-venv), pip into it
    # from a pip wheel in the wheelhouse, offline. Only the venv step runs (the install is runs/check_offline_install.sh)
    import ensurepip
    import glob
    import shutil
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    bundled = glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), "_bundled", "pip-*.whl"))
    if not bundled:  # Debian's python strips them (that is what python3-venv puts back)
        pytest.skip("this interpreter ships no pip wheel to stand in for the wheelhouse's")
    shutil.copy(bundled[0], wheels)
    py = fake_python(tmp_path, venv_works=False)
    env = dict(os.environ, NANOCHAT_PYTHON=py, NANOCHAT_VENV=str(tmp_path / "venv"), NANOCHAT_WHEELHOUSE=str(wheels),
               NANOCHAT_SETUP_VENV_ONLY="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    out = subprocess.run(["bash", "runs/setup_env.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "`venv --without-pip` and installed pip from a wheel (the wheelhouse)" in out.stdout
    pip = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "--version"], capture_output=True,
                         text=True)
    assert pip.returncode == 0 and str(tmp_path / "venv") in pip.stdout
