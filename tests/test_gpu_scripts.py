"""The GPU shell scripts, checked without a GPU: syntax, the dry run of runs/gpu_check.sh, and every flag
speedrun.sh and gpu_check.sh pass to a script exists in that script's argparse."""

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_SCRIPTS = ["speedrun.sh", "runs/gpu_check.sh", "runs/setup_env.sh"]


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


def test_gpu_check_dry_run_prints_every_stage(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_DIR=str(tmp_path))
    out = subprocess.run(["bash", "runs/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for stage in ["env", "pytest-gpu", "bench-train-bf16", "bench-train-fp8", "bench-infer", "e2e-tok_train",
                  "e2e-base_train", "e2e-chat_sft", "e2e-chat"]:
        assert f"=== [{stage}]" in out.stdout
    assert "GPU CHECK SUMMARY" in out.stdout
    assert "--device-batch-size=auto" in out.stdout and "--fp8" in out.stdout
