"""
The HumanEval sandbox (nanochat/execution.py): one test per promised property. Each call starts a fresh
Python process (~0.1 s), so the file runs in a few seconds; marked slow because it is multi-process.
"""

import os
import threading

import pytest

from nanochat.execution import execute_code, ExecutionResult

pytestmark = pytest.mark.slow


def test_happy_path_captures_stdout_and_stderr():
    r = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert isinstance(r, ExecutionResult)
    assert r.success and not r.timeout and not r.memory_exceeded and r.error is None
    assert r.stdout == "hello 42\n"
    assert r.stderr == "warn\n"


def test_humaneval_shaped_program():
    program = ("def add(a, b):\n    return a + b\n\n"
               "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n"
               "check(add)")
    assert execute_code(program).success
    assert not execute_code(program.replace("a + b", "a - b")).success


def test_exception_is_captured():
    r = execute_code("print('before')\nraise ValueError('boom')")
    assert not r.success and not r.timeout
    assert r.error == "ValueError: boom"
    assert r.stdout == "before\n"  # output up to the failure is kept
    assert "ValueError: boom" in r.stderr  # traceback goes to stderr


def test_syntax_error_is_captured():
    r = execute_code("def f(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")


def test_timeout_kills_infinite_loop():
    r = execute_code("print('started', flush=True)\nwhile True:\n    pass", timeout=1.0)
    assert not r.success and r.timeout
    assert "timed out" in r.error
    assert r.stdout == "started\n"


def test_sleep_past_timeout():
    r = execute_code("import time\ntime.sleep(30)", timeout=0.5)
    assert r.timeout and not r.success


def test_memory_limit():
    r = execute_code("x = bytearray(512 * 1024 * 1024)\nprint('allocated')",
                     maximum_memory_bytes=256 * 1024 * 1024)
    assert not r.success and r.memory_exceeded
    assert "allocated" not in r.stdout
    # a modest allocation under the same limit is fine
    r = execute_code("x = bytearray(32 * 1024 * 1024)\nprint(len(x))", maximum_memory_bytes=256 * 1024 * 1024)
    assert r.success and r.stdout == f"{32 * 1024 * 1024}\n"


def test_destructive_calls_fail(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in [f"import os\nos.remove({str(victim)!r})",
                 f"import os\nos.unlink({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 "import os\nos.system('echo pwned')",
                 "import subprocess\nsubprocess.Popen(['echo', 'pwned'])",
                 "import subprocess\nsubprocess.run(['echo', 'pwned'])",
                 "import os\nos.kill(os.getppid(), 9)",
                 "import os\nos.fork()",
                 "import os\nos.chdir('/')",
                 "exit(0)"]:
        r = execute_code(code)
        assert not r.success, code
        assert "pwned" not in r.stdout
    assert victim.read_text() == "keep me"


def test_stdin_disabled():
    r = execute_code("x = input()\nprint('got', x)", timeout=3.0)
    assert not r.success and not r.timeout  # EOF at once, never waits for a terminal
    assert r.error.startswith("EOFError")
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))", timeout=3.0)
    assert r.success and r.stdout == "''\n"


def test_temp_dir_isolation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = execute_code("open('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read())\n"
                     "import os\nprint(sorted(os.listdir('.')))")
    assert r.success and r.stdout == "data\n['scratch.txt']\n"  # starts in an empty directory
    assert not (tmp_path / "scratch.txt").exists()  # not the caller's cwd
    # the next run gets a fresh, empty directory (the previous one was deleted)
    r = execute_code("import os\nprint(os.path.exists('scratch.txt'), os.listdir('.'))")
    assert r.success and r.stdout == "False []\n"


def test_temp_dir_deleted():
    r = execute_code("import os\nprint(os.environ['HOME'])")  # HOME points at the working directory
    assert r.success
    workdir = r.stdout.strip()
    assert "nanochat_exec" in workdir
    assert not os.path.exists(workdir)


def test_env_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("NANOCHAT_SECRET_TOKEN", "hunter2")
    r = execute_code("import os\nprint(dict(os.environ))")
    assert r.success
    assert "sk-secret" not in r.stdout and "hunter2" not in r.stdout
    assert "OPENAI_API_KEY" not in r.stdout


def test_output_is_bounded():
    r = execute_code("while True:\n    print('x' * 10000)", timeout=5.0)
    assert not r.success
    assert len(r.stdout) <= 1 << 20


def test_fresh_globals_and_main_name():
    r = execute_code("print(__name__, sorted(k for k in globals() if not k.startswith('__')))")
    assert r.success and r.stdout == "__main__ []\n"


def test_concurrent_calls_from_threads():
    results = [None] * 4

    def work(i):
        results[i] = execute_code(f"print({i} * {i})")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(4)]


def test_bad_arguments():
    with pytest.raises(TypeError):
        execute_code(b"print(1)")
    with pytest.raises(ValueError):
        execute_code("print(1)", timeout=0)
