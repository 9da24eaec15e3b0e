"""
The library's import structure: no circle among nanochat's modules, counting imports inside functions too (an
import moved into a function to dodge a circle is still a circle); nanochat never imports scripts/ or tasks/;
and importing any library module changes no process-wide state (sys.excepthook, os.environ, the root logger): scripts opt in.
"""

import ast
import os
import subprocess
import sys

from conftest import REPO

LIBRARY = os.path.join(REPO, "nanochat")


def imported_modules(path):
    """Every module named by an import anywhere in the file (top level, functions, classes)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from nanochat import checkpoint_manager`: the name is a module
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def library_graph():
    modules = {f[:-3] for f in os.listdir(LIBRARY) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for m in modules:
        names = imported_modules(os.path.join(LIBRARY, m + ".py"))
        graph[m] = {n.split(".")[1] for n in names if n.startswith("nanochat.") and n.split(".")[1] in modules} - {m}
    return graph


def find_cycle(graph):
    """A list of modules forming a circle, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_library_has_no_import_circle():
    graph = library_graph()
    assert "checkpoint_manager" in graph["model_loader"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_library_never_imports_scripts_or_tasks():
    for f in sorted(os.listdir(LIBRARY)):
        if f.endswith(".py"):
            bad = {n for n in imported_modules(os.path.join(LIBRARY, f)) if n.split(".")[0] in ("scripts", "tasks")}
            assert not bad, f"nanochat/{f} imports {sorted(bad)}"


def run_fresh(code):
    """Run `code` in a fresh interpreter at the repository root; it must exit 0."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_importing_the_library_changes_no_process_state():
    # hf_modeling is the standalone modeling file of an export, run by transformers (whose own import sets
    # $TORCHINDUCTOR_CACHE_DIR), never by the library
    modules = sorted(f[:-3] for f in os.listdir(LIBRARY) if f.endswith(".py") and f not in ("__init__.py",
                                                                                          "hf_modeling.py"))
    code = ("import os, sys, importlib, logging\n"
            "hook, env = sys.excepthook, dict(os.environ)\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module('nanochat.' + m)\n"
            "assert sys.excepthook is hook, 'sys.excepthook replaced at import'\n"
            "assert not logging.getLogger().handlers, 'logging configured at import'\n"
            "changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))\n"
            "assert not changed, f'os.environ changed at import: {changed}'\n")
    run_fresh(code)


def test_scripts_log_the_librarys_info_lines_and_only_warnings_of_other_libraries():
    code = ("import logging\n"
            "from nanochat.common import init_script\n"
            "init_script()\n"
            "logging.getLogger('nanochat').info('library info line')\n"
            "logging.getLogger('httpx').info('HTTP Request: GET /stats')\n"
            "logging.getLogger('httpx').warning('a warning of another library')\n")
    proc = run_fresh(code)
    assert proc.stderr.splitlines() == ["library info line", "a warning of another library"]
