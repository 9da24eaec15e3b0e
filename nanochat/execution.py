"""
Run untrusted, model-written Python (HumanEval completions) in a separate process.

THIS IS NOT A SECURITY BOUNDARY. It keeps honest-but-buggy programs from hurting the evaluation run: infinite
loops are killed, runaway allocations hit a memory limit, files go to a throw-away directory, stdin is closed,
the environment (API keys, tokens) is not inherited, and common destructive functions (os.system, os.remove,
shutil.rmtree, subprocess.Popen, ...) are replaced by None. A malicious program can undo all of that (ctypes,
network, reading the user's files): run real untrusted code inside a container or VM.

A runner script (`sys.executable -I`, cwd an empty temp directory) sets resource limits, disables destructive
functions, runs the program and writes how it ended to a JSON status file; the parent kills the process group
after `timeout` seconds and deletes both temp directories.
"""

import os
import sys
import json
import signal
import shutil
import contextlib
import tempfile
import subprocess
from dataclasses import dataclass

MAX_OUTPUT_BYTES = 1 << 20  # per stream; enforced in the child with RLIMIT_FSIZE


@dataclass
class ExecutionResult:
    success: bool  # the program ran to the end without an exception
    stdout: str
    stderr: str
    error: str | None = None  # "ExceptionType: message" or a description of how it was stopped
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        parts = [f"success={self.success}"]
        parts += [f"{flag}=True" for flag in ("timeout", "memory_exceeded") if getattr(self, flag)]
        if self.error:
            parts.append(f"error={self.error!r}")
        parts += [f"{name}={getattr(self, name)[:200]!r}" for name in ("stdout", "stderr") if getattr(self, name)]
        return f"ExecutionResult({', '.join(parts)})"


# The runner executes in the child. argv: program path, status path, timeout, memory bytes, output bytes.
# It only uses the standard library and must set the limits *before* touching the program.
_RUNNER = r'''
import sys, json, builtins, traceback, contextlib
prog_path, status_path = sys.argv[1], sys.argv[2]
timeout, max_mem, max_out = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(prog_path) as f:
    source = f.read()
status = open(status_path, "w")  # opened before the guards so the runner can still report

import os, platform, resource, signal, faulthandler, shutil, subprocess

def _limit(kind, value):
    # ValueError/OSError: e.g. the hard limit is already lower, or the platform does not support it
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(kind, (value, value))

if max_mem > 0 and platform.uname().system != "Darwin":  # macOS does not enforce RLIMIT_AS
    _limit(resource.RLIMIT_AS, max_mem)
    _limit(resource.RLIMIT_DATA, max_mem)
    _limit(resource.RLIMIT_STACK, min(max_mem, 64 * 1024 * 1024))
_limit(resource.RLIMIT_CPU, int(timeout) + 2)  # backstop if the parent's kill never arrives
_limit(resource.RLIMIT_FSIZE, max_out)  # bounds stdout/stderr files and anything the program writes
_limit(resource.RLIMIT_CORE, 0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise OSError instead of killing us

# Disable destructive functions (reliability guard, not security).
faulthandler.disable()
for name in ["exit", "quit", "help"]:
    setattr(builtins, name, None)
for name in ["kill", "killpg", "system", "remove", "removedirs", "rmdir", "fchdir",
             "setuid", "setgid", "setsid", "fork", "forkpty", "vfork", "execv", "execve", "execvp",
             "execl", "execlp", "execle", "spawnv", "spawnve", "spawnl", "popen", "posix_spawn",
             "posix_spawnp", "rename", "renames", "truncate", "ftruncate", "replace", "unlink", "fchmod",
             "fchown", "chmod", "chown", "chroot", "lchown", "lchmod", "lchflags", "chflags", "link",
             "symlink", "getcwd", "chdir", "mkfifo", "mknod", "plock", "nice", "setpriority"]:
    if hasattr(os, name):
        setattr(os, name, None)
for module, names in [(shutil, ["rmtree", "move", "chown"]),
                      (subprocess, ["Popen", "run", "call", "check_call", "check_output"])]:
    for name in names:
        setattr(module, name, None)
for name in ["ipdb", "joblib", "resource", "psutil", "tkinter"]:
    sys.modules[name] = None  # `import resource` now raises ImportError, so limits can't be raised again

result = {"success": False, "error": None, "memory_exceeded": False}
try:
    code = compile(source, "<program>", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})
    result["success"] = True
except MemoryError:
    result["memory_exceeded"] = True
    result["error"] = "MemoryError: memory limit exceeded"
except SystemExit as e:
    result["success"] = e.code in (None, 0)
    if not result["success"]:
        result["error"] = f"SystemExit: {e.code}"
except BaseException as e:
    result["error"] = f"{type(e).__name__}: {e}"[:2000]
    with contextlib.suppress(BaseException):
        traceback.print_exc()
with contextlib.suppress(BaseException):
    sys.stdout.flush()
status.write(json.dumps(result))
status.close()
'''


def _read_capped(path, limit):
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run the program `code` (a str) in a sandboxed child process -> ExecutionResult; never raises for problems
    inside the program. `maximum_memory_bytes` <= 0 or None: no memory limit. Thread-safe."""
    if not isinstance(code, str):
        raise TypeError(f"execute_code expects the program as a str, got {type(code).__name__}")
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    max_mem = int(maximum_memory_bytes or 0)
    control_dir = tempfile.mkdtemp(prefix="nanochat_exec_ctl_")  # runner, program, outputs, status
    work_dir = tempfile.mkdtemp(prefix="nanochat_exec_cwd_")  # the program's cwd, empty
    try:
        names = ("runner.py", "program.py", "status.json", "stdout.txt", "stderr.txt")
        runner_path, prog_path, status_path, out_path, err_path = (os.path.join(control_dir, n) for n in names)
        with open(runner_path, "w") as f:
            f.write(_RUNNER)
        with open(prog_path, "w") as f:
            f.write(code)
        # minimal environment: nothing of the parent's (API keys, tokens, proxies) leaks in
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work_dir,
               "TMPDIR": work_dir, "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", runner_path, prog_path, status_path, repr(float(timeout)),
               str(max_mem), str(MAX_OUTPUT_BYTES)]
        timed_out = False
        with open(out_path, "wb") as fout, open(err_path, "wb") as ferr:
            proc = subprocess.Popen(cmd, cwd=work_dir, env=env, stdin=subprocess.DEVNULL, stdout=fout,
                                    stderr=ferr, start_new_session=True, close_fds=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # kill the whole group: the program may have started children before the guards bit
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stdout = _read_capped(out_path, MAX_OUTPUT_BYTES)
        stderr = _read_capped(err_path, MAX_OUTPUT_BYTES)
        if timed_out:
            return ExecutionResult(False, stdout, stderr, f"Execution timed out after {timeout} seconds",
                                   timeout=True)
        try:
            with open(status_path) as f:
                status = json.loads(f.read())
        except (OSError, ValueError):
            status = None
        if status is None:
            # died without reporting: a signal (SIGXCPU from RLIMIT_CPU, SIGSEGV when malloc fails
            # under RLIMIT_AS in C code, ...) or the runner itself failed
            rc = proc.returncode
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            cpu_limit = rc == -signal.SIGXCPU
            mem = "MemoryError" in stderr or "Cannot allocate memory" in stderr
            return ExecutionResult(False, stdout, stderr, f"Process ended without a status ({how})",
                                   timeout=cpu_limit, memory_exceeded=mem)
        return ExecutionResult(bool(status["success"]), stdout, stderr, status["error"],
                               timeout=False, memory_exceeded=bool(status["memory_exceeded"]))
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
