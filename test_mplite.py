"""Tests of mplite through its public API only: real processes, real signals, real pipes, no mocks.

Functions used as tasks live at module level: spawn and forkserver workers import this file as the
module ``test_mplite`` (pytest puts its folder on sys.path, which the workers inherit; a test checks it).
Lambdas, closures and functions of a notebook or of `python -c`, which travel by value instead, are
defined where the tests use them.
Every test runs under a watchdog, so a hang ends the run with tracebacks instead of blocking CI.

On Windows (spawn only) the tests of fork and forkserver are not collected, and those that need
POSIX-only things (signals sent to processes, process groups, os.fork) are skipped, each saying
why (posix_only); what runs there is the portable subset that CI runs on Windows.
"""
import _thread
import ast
import asyncio
import concurrent.futures
import contextlib
import ctypes
import enum
import faulthandler
import functools
import gc
import importlib
import importlib.util
import inspect
import itertools
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import traceback
import types
import weakref
from collections import Counter
from concurrent.futures.process import BrokenProcessPool

import pytest

import mplite
from mplite import Task, TaskChain, TaskManager

try:
    import resource
except ImportError:  # Windows
    resource = None

WINDOWS = sys.platform == "win32"
METHODS = ["spawn"] if WINDOWS else ["spawn", "fork", "forkserver"]  # all this system has
FAST_METHOD = "spawn" if WINDOWS else "fork"  # where the start method doesn't matter: fork starts quickest
WATCHDOG_S = 120  # per test; far above what any test needs, only there to turn a hang into a failure


def posix_only(why):
    """Skip on Windows, saying why: the test needs something only POSIX systems have."""
    return pytest.mark.skipif(WINDOWS, reason="POSIX only: " + why)


def where_available(params):
    """The parametrize values (a value or a tuple of them) that name no start method this system
    lacks: on Windows, those without "fork" or "forkserver"."""
    lacking = {"fork", "forkserver"} - set(METHODS)
    return [p for p in params if not lacking & set(p if isinstance(p, tuple) else (p,))]


def kill_hard(pid):
    """End process pid at once, with no cleanup, as the OOM killer would: SIGKILL. Windows has no
    signals; there os.kill() with any but the console events is TerminateProcess (exit code 15)."""
    os.kill(pid, signal.SIGTERM if WINDOWS else signal.SIGKILL)


# What the error of a task whose worker kill_hard() ended must name: the signal. On Windows, where
# the words for an exit code are mplite's own to choose (issue 17), only that a worker died.
KILLED = "ChildProcessError" if WINDOWS else "SIGKILL"


# ---------------------------------------------------------------------------------------------
# Task functions (module level, so that spawn/forkserver workers can unpickle them)
# ---------------------------------------------------------------------------------------------

def f(*args, **kwargs):  # the published showcase's task
    time.sleep(args[0])
    return args[0] / kwargs['hello']


def broken(*args, **kwargs):  # the published showcase's failing task
    raise NotImplementedError("this task must fail!")


def adder(a, b):
    return a + b


def double(x):
    return 2 * x


def echo(*args, **kwargs):
    return args, kwargs


def return_none():
    return None


def sleep_return(seconds, value):
    time.sleep(seconds)
    return value


def append_line(path, text):
    with open(path, "a") as fh:
        fh.write(text + "\n")
    return text


def file_exists(path):
    return os.path.exists(path)


def wait_for_file(path, value, limit=60):
    """Block until `path` exists (a gate the test opens), then return value; bounded by `limit`."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def rendezvous(folder, n, limit=30):
    """Wait until n distinct processes have arrived in `folder`; return this worker's pid.

    Run n of these on an n-worker pool and each worker runs exactly one, so the pids are the pool's
    workers, found without any timing assumption (bounded by `limit` if the pool has fewer workers).
    """
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + limit
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


INIT_STATE = None  # set by init_worker inside workers


def init_worker(folder):
    global INIT_STATE
    INIT_STATE = os.getpid()
    os.environ["MPLITE_TEST_INIT"] = str(os.getpid())
    open(os.path.join(folder, "init-%d" % os.getpid()), "w").close()


def report_worker(folder, n):
    pid = rendezvous(folder, n)
    return pid, os.environ.get("MPLITE_TEST_INIT"), INIT_STATE


def module_identity():
    return __name__, os.path.abspath(__file__), os.getpid()


def raise_value_error(message):
    raise ValueError(message)


class TwoArgError(Exception):
    """Can be pickled but not rebuilt: unpickling calls TwoArgError(message) and misses an argument."""

    def __init__(self, a, b):
        super().__init__("two-arg error %s %s" % (a, b))


def raise_two_arg_error(a, b):
    raise TwoArgError(a, b)


class LockHoldingError(Exception):
    """Can't be pickled at all: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_lock_holding_error(message):
    raise LockHoldingError(message)


def sleep_getpid(seconds):
    time.sleep(seconds)
    return os.getpid()


def echo_bytes(tag, data):
    return tag, data


def kill_self(pid_file):
    with open(pid_file, "w") as fh:
        fh.write(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


# TaskChain next_task callables (they run in the parent). As in 1.x, a returned Task is the chain's
# last step; a returned TaskChain goes on with its own next_task.

def double_until_100(prev_task, result):
    return None if result >= 100 else TaskChain(Task(double, result), double_until_100)


def chain_stop(prev_task, result):
    return None


def then_double(prev_task, result):
    return Task(double, result)


def to_subchain(prev_task, result):
    return TaskChain(Task(double, result), then_double)


def describe_prev(prev_task, result):
    return Task(echo, prev_task.f.__name__, prev_task.args, result)


class CallableAdder:
    def __call__(self, a, b):
        return a + b


# ---------------------------------------------------------------------------------------------
# Test helpers
# ---------------------------------------------------------------------------------------------

def bounded(fn, seconds=60):
    """Run fn() in a daemon thread; fail the test (instead of hanging the suite) if it doesn't return."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail("hang: the call had not returned after %ss" % seconds)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def worker_pids(tm, parent_dir, n):
    """The pids of the n workers of `tm` (see rendezvous)."""
    folder = tempfile.mkdtemp(dir=str(parent_dir))
    return set(tm.execute([Task(rendezvous, folder, n) for _ in range(n)], progress=False))


def pids_seen_eventually(tm, n, rounds=30):
    """Distinct worker pids seen over rounds of short sleeping tasks, until n have been seen (bounded).

    For a pool that may still be booting a replacement worker: a worker that isn't ready yet gets
    nothing, so rendezvous() could strand a task on a busy worker; later rounds reach the new worker.
    """
    seen = set()
    for _ in range(rounds):
        seen.update(tm.execute([Task(sleep_getpid, 0.1) for _ in range(2 * n)], progress=False))
        if len(seen) >= n:
            break
    return seen


# Processes are looked at through /proc where there is one (Linux), through ps elsewhere on POSIX
# (macOS), and on Windows through kernel32 (a Toolhelp snapshot, OpenProcess): never a check that
# passes because it can't see (a test that can't look is skipped, saying why).
PROCFS = os.path.isfile("/proc/self/stat")
# What os.kill() raises for a pid that has gone: on Windows, OpenProcess's error (an OSError).
PROCESS_GONE = OSError if WINDOWS else ProcessLookupError


def pid_running(pid):
    """True while pid exists and is not a zombie (on Windows: has not ended)."""
    if WINDOWS:
        return _win_process_status(pid)[0] is True
    if not PROCFS:
        try:
            os.kill(pid, 0)  # a zombie exists too: ps tells it apart
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process
        state = _ps("-o", "stat=", "-p", str(pid))[1].strip()
        return bool(state) and state[0] not in ("Z", "X", "x")
    try:
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X", "x")


def _ps(*args):
    """(ps's own pid, its output), ps being that of macOS and the BSDs or of procps: options both have.

    Started by posix_spawn, with its output in a file: with a pipe (subprocess's own pipes too) a
    fork worker that mplite starts meanwhile, from its engine thread, inherits the pipe's write end,
    and reading up to EOF waits for that worker (this hung test_fault_worker_death_str_mode[fork])."""
    with tempfile.TemporaryFile() as out:
        pid = os.posix_spawnp("ps", ("ps",) + args, os.environ,
                              file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        with contextlib.suppress(ChildProcessError):  # reaped elsewhere: it has ended all the same
            os.waitpid(pid, 0)
        out.seek(0)
        return pid, out.read().decode(errors="replace")


_KERNEL32 = []


def _kernel32():
    """(kernel32, PROCESSENTRY32W), with the signatures of the calls used here: Windows only."""
    if not _KERNEL32:
        from ctypes import wintypes

        class PROCESSENTRY32W(ctypes.Structure):
            _fields_ = [("dwSize", wintypes.DWORD), ("cntUsage", wintypes.DWORD),
                        ("th32ProcessID", wintypes.DWORD), ("th32DefaultHeapID", ctypes.c_size_t),
                        ("th32ModuleID", wintypes.DWORD), ("cntThreads", wintypes.DWORD),
                        ("th32ParentProcessID", wintypes.DWORD), ("pcPriClassBase", wintypes.LONG),
                        ("dwFlags", wintypes.DWORD), ("szExeFile", ctypes.c_wchar * 260)]

        k32 = ctypes.WinDLL("kernel32", use_last_error=True)  # an instance of our own to type
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        k32.GetExitCodeProcess.argtypes = (wintypes.HANDLE, ctypes.POINTER(wintypes.DWORD))
        k32.GetProcessTimes.argtypes = (wintypes.HANDLE,) + (ctypes.POINTER(ctypes.c_ulonglong),) * 4
        k32.CloseHandle.argtypes = (wintypes.HANDLE,)
        k32.CreateToolhelp32Snapshot.restype = wintypes.HANDLE
        k32.CreateToolhelp32Snapshot.argtypes = (wintypes.DWORD, wintypes.DWORD)
        for name in ("Process32FirstW", "Process32NextW"):
            getattr(k32, name).argtypes = (wintypes.HANDLE, ctypes.POINTER(PROCESSENTRY32W))
        _KERNEL32.append((k32, PROCESSENTRY32W))
    return _KERNEL32[0]


def _win_process_status(pid):
    """(running, creation time) of pid on Windows. running: None where no such process exists,
    False where it has ended (a handle to it still holds it: Windows's zombie), else True (so too
    where this user may not open it); creation time: None where it can't be read."""
    from ctypes import wintypes
    k32, _ = _kernel32()
    handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return (True if ctypes.get_last_error() == 5 else None), None  # 5: ERROR_ACCESS_DENIED
    try:
        code, times = wintypes.DWORD(), [ctypes.c_ulonglong() for _ in range(4)]
        running = not k32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        created = times[0].value if k32.GetProcessTimes(handle, *map(ctypes.byref, times)) else None
    finally:
        k32.CloseHandle(handle)
    return running, created


def _win_snapshot():
    """{pid: (ppid, exe name)} of every process Windows lists now (a Toolhelp snapshot)."""
    k32, entry_type = _kernel32()
    snapshot = k32.CreateToolhelp32Snapshot(2, 0)  # TH32CS_SNAPPROCESS
    if snapshot in (None, ctypes.c_void_p(-1).value):  # INVALID_HANDLE_VALUE
        raise ctypes.WinError(ctypes.get_last_error())
    found = {}
    try:
        entry = entry_type()
        entry.dwSize = ctypes.sizeof(entry_type)
        more = k32.Process32FirstW(snapshot, ctypes.byref(entry))
        while more:
            found[entry.th32ProcessID] = (entry.th32ParentProcessID, entry.szExeFile)
            more = k32.Process32NextW(snapshot, ctypes.byref(entry))
    finally:
        k32.CloseHandle(snapshot)
    return found


def _win_process_table():
    """{pid: (ppid, state, exe name)} on Windows, state "R", or "Z" for one that has ended.

    Windows keeps a dead parent's pid as the ppid of its children, and reuses pids: a ppid that
    names a process made after its child is stale, and reads -1. conhost.exe, the console host
    Windows starts beside a console program that has none, is left out: it is no worker."""
    snapshot = _win_snapshot()
    status = {pid: _win_process_status(pid) for pid in snapshot}
    table = {}
    for pid, (ppid, name) in snapshot.items():
        running, created = status[pid]
        if running is None or name.lower() == "conhost.exe":
            continue  # gone since the snapshot, or a console host
        if ppid not in status:
            status[ppid] = _win_process_status(ppid)  # a parent that has ended: its handle may hold it
        parent_created = status[ppid][1]
        if ppid == pid or (created is not None and parent_created is not None and parent_created > created):
            ppid = -1
        table[pid] = (ppid, "R" if running else "Z", name)
    return table


def wait_gone(pids, limit=15):
    """Poll (bounded) until none of pids is running; return those still running."""
    deadline = time.monotonic() + limit
    while any(pid_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if pid_running(p)]


def open_gate_later(gate, seconds=1.0):
    """Create the file `gate` from a timer thread, so the test doesn't depend on which worker got what."""
    timer = threading.Timer(seconds, lambda: open(gate, "w").close())
    timer.start()
    return timer


def raise_lineno(func, needle):
    """Line number (in this file) of the first source line of func that contains needle."""
    lines, start = inspect.getsourcelines(func)
    return start + next(i for i, line in enumerate(lines) if needle in line)


# The processes multiprocessing itself starts once per interpreter and shares between all pools: the
# resource tracker (spawn/forkserver) and the forkserver. mplite neither owns nor can stop them; they
# exit with pytest (they watch a pipe from it). They are not strays, but their children are: forkserver
# workers are children of the forkserver, so the walk goes through them.
MULTIPROCESSING_SINGLETONS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _cmdline(pid):
    """pid's command line; on Windows only its program's name (the rest is in that process's memory;
    nor has Windows any multiprocessing singleton to tell by its command line)."""
    if WINDOWS:
        return _win_snapshot().get(pid, (0, ""))[1]
    if not PROCFS:
        return _ps("-ww", "-o", "command=", "-p", str(pid))[1].strip()
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendant_processes(root=None):
    """[(pid, state, cmdline)] of every descendant of root (default: this process) found via
    _fault_proc_table(), zombies included, the multiprocessing singletons above excluded."""
    root = os.getpid() if root is None else root
    table = _fault_proc_table()
    children, states = {}, {pid: state for pid, (_, state) in table.items()}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [(pid, True) for pid in children.get(root, [])]
    while todo:
        pid, direct = todo.pop()
        todo.extend((child, False) for child in children.get(pid, []))
        cmd = _cmdline(pid)
        # only a direct child can be a singleton: forkserver workers inherit the forkserver's cmdline
        if not (direct and any(marker in cmd for marker in MULTIPROCESSING_SINGLETONS)):
            found.append((pid, states[pid], cmd))
    return found


# ---------------------------------------------------------------------------------------------
# Fixtures: watchdog, stray-process check, shared pools
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module", autouse=True)
def no_stray_processes():
    """After this module (all its managers and executors stopped), no worker of ours may be left
    behind, nor any thread of mplite's, nor any non-daemon thread that would hold up the exit."""
    yield
    deadline = time.monotonic() + 15  # stopped workers may take a moment to be reaped
    while (multiprocessing.active_children() or descendant_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == []
    assert descendant_processes() == []
    deadline = time.monotonic() + 15
    while leftover_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftover_threads() == []


def leftover_threads():
    """Live threads other than the main one that are mplite's or not daemons."""
    return sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()
                  and (t.name.startswith("mplite") or not t.daemon))


class Pools:
    """Running managers (2 workers) shared by this module's tests, one per (start method, error mode)."""

    def __init__(self):
        self.managers = {}

    def get(self, method, error_mode="str"):
        key = (method, error_mode)
        if key not in self.managers:
            tm = TaskManager(2, context=method, error_mode=error_mode)
            tm.start()
            self.managers[key] = tm
        return self.managers[key]

    def release(self, tm):
        """A test that left tasks open (it failed) gets its pool replaced, so later tests start clean."""
        try:
            clean = tm.open_tasks == 0
        except Exception:
            clean = False
        if not clean:
            for key, value in list(self.managers.items()):
                if value is tm:
                    del self.managers[key]
            tm.stop()

    def close(self):
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        for tm in self.managers.values():
            tm.stop()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pools():
    cache = Pools()
    yield cache
    cache.close()


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


@pytest.fixture
def pool(pools, method):
    """A running 2-worker manager, error_mode="str", for each start method."""
    tm = pools.get(method)
    yield tm
    pools.release(tm)


@pytest.fixture
def xpool(pools, method):
    """A running 2-worker manager, error_mode="exception", for each start method."""
    tm = pools.get(method, "exception")
    yield tm
    pools.release(tm)


@pytest.fixture
def spool(pools):
    """The spawn pool, for tests where the start method doesn't matter."""
    tm = pools.get("spawn")
    yield tm
    pools.release(tm)


# ---------------------------------------------------------------------------------------------
# Module surface and source promises
# ---------------------------------------------------------------------------------------------

def test_version_and_all():
    assert mplite.__version__ == "3.0.0"
    assert mplite.__all__ == ["Task", "TaskChain", "TaskManager", "ProcessPoolExecutor", "UnpicklableTaskError",
                              "WorkerDiedError"]


PORTABLE_PROBE = """
import os, sys, mplite
from mplite import Task, TaskManager

def die():
    os._exit(3)

if __name__ == "__main__":
    with TaskManager(2) as tm:
        results = tm.execute([Task(abs, -1), Task(die), Task(abs, -2)], progress=False)
        print(mplite._PORTABLE, mplite._Link.__name__)
        print(results[0], results[2], results[1].splitlines()[-1])
        with mplite.ProcessPoolExecutor(2) as ex:
            print(sum(ex.map(abs, range(-5, 0))))
"""


@pytest.mark.parametrize("portable", ["1", ""])
def test_mplite_portable_selects_the_path_windows_runs(portable, tmp_path):
    # The default run of this suite exercises the portable path at least this much; .ci/run runs
    # the pool and fault tests again with MPLITE_PORTABLE=1.
    script = tmp_path / "probe.py"
    script.write_text(PORTABLE_PROBE)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)), MPLITE_PORTABLE=portable)
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    out = proc.stdout.decode(errors="replace").splitlines()
    assert proc.returncode == 0, out
    assert out[0] == ("True _ConnLink" if portable or WINDOWS else "False _FdLink"), out  # Windows: always
    assert out[1].startswith("1 2 ChildProcessError: the worker process") and "exited with code 3" in out[1], out
    assert out[2] == "15", out


def test_source_is_stdlib_only_and_parses_as_python_3_8():
    with open(mplite.__file__, encoding="utf-8") as fh:
        src = fh.read()
    tree = ast.parse(src, feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a single-file module"
            imported.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name in ("__import__", "import_module"):  # dynamic imports count too
                imported.add(node.args[0].value)
    outside = sorted(m for m in imported if not is_stdlib(m.split(".")[0]))
    assert imported and outside == []


def is_stdlib(name):
    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+
        return name in sys.stdlib_module_names
    if name in sys.builtin_module_names:
        return True
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    paths = sysconfig.get_paths()
    return "site-packages" not in spec.origin and spec.origin.startswith((paths["stdlib"], paths["platstdlib"]))


def test_python_m_mplite_self_test_exits_0(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, "-m", "mplite"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:]


def readme_scripts():
    """The README's complete examples: its python blocks that run as scripts."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    return [block for block in blocks if '__name__ == "__main__"' in block]


README_OUTPUTS = [  # what each of the README's runnable examples prints, in part
    ["hereof 5 had errors.", "expected --> Traceback"],
    ["sum: 55"],
    ["[100, 101, 102]", "[0, 3, 6]"],
    ["144", "[0, 1, 4, 9, 16]", "asyncio: 25"],
    ["[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]", "sum: 333328333350000"],
]
README_NOTEBOOK_EXAMPLE = 2
README_DASK_EXAMPLE = 4  # runs where distributed is installed (.ci/run's dask step)


@pytest.mark.parametrize("index", range(len(README_OUTPUTS)))
def test_readme_examples_run(index, tmp_path):
    if index == README_DASK_EXAMPLE and importlib.util.find_spec("distributed") is None:
        pytest.skip("the dask example needs distributed (pip install '.[dask]')")
    scripts = readme_scripts()
    assert len(scripts) == len(README_OUTPUTS), "the README's runnable examples changed: update this test"
    script = tmp_path / "example.py"
    script.write_text(scripts[index], encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert all(text in out for text in README_OUTPUTS[index]), out[-3000:]


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_readme_notebook_example_runs_as_typed_into_a_repl(how, tmp_path):
    # Piped into `python -` or given to `python -c`, its __main__ is no file the workers can
    # import: every function of it travels by value, and worker_init's global reaches the tasks.
    source = readme_scripts()[README_NOTEBOOK_EXAMPLE]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    args = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", source]
    proc = subprocess.run(args, input=source.encode() if how == "stdin" else None, cwd=str(tmp_path),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-3000:]
    assert all(text in out for text in README_OUTPUTS[README_NOTEBOOK_EXAMPLE]), out[-3000:]


def test_spawn_workers_import_this_file_as_module_test_mplite(spool):
    [(name, path, pid)] = spool.execute([Task(module_identity)], progress=False)
    assert name == "test_mplite" == __name__
    assert path == os.path.abspath(__file__)
    assert pid != os.getpid()


# ---------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("not_callable", [5, "f", None, (adder,)])
def test_task_requires_a_callable(not_callable):
    with pytest.raises(TypeError):
        Task(not_callable, 1, 2)


def test_task_attributes():
    t = Task(adder, 1, 2, hello=3)
    assert t.f is adder
    assert t.args == (1, 2)
    assert t.kwargs == {"hello": 3}
    assert isinstance(t.id, int)


def test_task_ids_are_unique_and_increasing():
    ids = [Task(adder, i, i).id for i in range(200)]
    assert ids == sorted(ids) and len(set(ids)) == 200
    chain_ids = [TaskChain(Task(adder, i, i)).id for i in range(20)]
    assert len(set(chain_ids)) == 20 and all(isinstance(i, int) for i in chain_ids)


def test_task_repr_and_str_exact():
    t = Task(f, *(0.0,), **{'hello': 0})
    assert str(t) == repr(t) == "Task(f=f, *(0.0,), **{'hello': 0})"
    assert repr(Task(adder, 1, 2)) == "Task(f=adder, *(1, 2), **{})"


@pytest.mark.parametrize("func", [functools.partial(adder, 1), CallableAdder(), len],
                         ids=["partial", "callable_object", "builtin"])
def test_task_repr_of_unusual_callables_does_not_crash(func):
    t = Task(func, 2)
    assert str(t) == repr(t)
    assert repr(t).startswith("Task(f=")


def test_task_execute_runs_locally():
    assert Task(f, 0.0, hello=1).execute() == 0.0
    assert Task(echo, 1, 2, a=3).execute() == ((1, 2), {"a": 3})
    assert Task(functools.partial(adder, 1), 2).execute() == 3
    assert Task(CallableAdder(), 2, 3).execute() == 5


def test_task_execute_propagates_exceptions():
    with pytest.raises(NotImplementedError, match="this task must fail!"):
        Task(broken, 1).execute()
    with pytest.raises(ZeroDivisionError):
        Task(f, 0.0, hello=0).execute()


# ---------------------------------------------------------------------------------------------
# TaskChain
# ---------------------------------------------------------------------------------------------

def test_chain_attributes_and_local_execute():
    first = Task(double, 3)
    chain = TaskChain(first, double_until_100)
    assert chain.task is first and chain.next is double_until_100
    assert chain.execute() == 192  # 3 6 12 24 48 96 192


def test_chain_without_next_task_is_its_task():
    chain = TaskChain(Task(adder, 1, 2))
    assert chain.next is None
    assert chain.execute() == 3


def test_chain_local_next_returning_a_task_or_a_chain_and_seeing_prev_task():
    assert TaskChain(Task(adder, 1, 2), then_double).execute() == 6
    assert TaskChain(Task(adder, 1, 2), to_subchain).execute() == 12
    assert TaskChain(Task(adder, 1, 2), describe_prev).execute() == (("adder", (1, 2), 3), {})


def test_chains_mixed_with_tasks_in_execute(pool):
    tasks = [
        Task(adder, 1, 1),
        TaskChain(Task(double, 3), double_until_100),
        Task(adder, 2, 2),
        TaskChain(Task(adder, 1, 2), then_double),
        TaskChain(Task(adder, 1, 2), to_subchain),
        TaskChain(Task(adder, 1, 2), describe_prev),
        TaskChain(Task(adder, 5, 5)),
        TaskChain(Task(adder, 5, 5), chain_stop),
    ]
    assert pool.execute(tasks, progress=False) == [2, 192, 4, 6, 12, (("adder", (1, 2), 3), {}), 10, 10]


def test_chain_via_submit_take_and_as_completed(pool):
    chain = TaskChain(Task(double, 3), double_until_100)
    assert pool.submit(chain) == chain.id
    assert pool.take(timeout=60) == 192
    chain = TaskChain(Task(adder, 1, 2), to_subchain)
    pool.submit(chain)
    pairs = list(pool.as_completed(timeout=60))
    assert len(pairs) == 1 and pairs[0][0] is chain and pairs[0][1] == 12
    assert pool.open_tasks == 0


# ---------------------------------------------------------------------------------------------
# TaskManager construction
# ---------------------------------------------------------------------------------------------

def test_cpu_count_default_is_the_affinity_mask(tmp_path):
    # where there is no affinity mask (macOS, Windows): the CPU count, at most 61 on Windows
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = min(os.cpu_count(), 61) if WINDOWS else os.cpu_count()
    with TaskManager() as tm:
        assert len(worker_pids(tm, tmp_path, n)) == n


def test_positional_cpu_count(tmp_path):
    with TaskManager(2) as tm:
        assert len(worker_pids(tm, tmp_path, 2)) == 2
        assert tm.map(double, [1, 2, 3]) == [2, 4, 6]


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                          ("2", TypeError), (True, TypeError), (False, TypeError)])
def test_cpu_count_validation(value, error):
    with pytest.raises(error):
        TaskManager(cpu_count=value)


@pytest.mark.parametrize("value, error", [("threads", ValueError), ("", ValueError),
                                          (42, TypeError), (object(), TypeError)])
def test_context_validation(value, error):
    with pytest.raises(error):
        TaskManager(2, context=value)


@pytest.mark.parametrize("method_name", where_available(["fork", "spawn"]))
def test_context_object_accepted(method_name):
    with TaskManager(2, context=multiprocessing.get_context(method_name)) as tm:
        assert tm.execute([Task(adder, 1, 2)], progress=False) == [3]


@pytest.mark.parametrize("value", ["raise", "", None, "STR"])
def test_error_mode_validation(value):
    with pytest.raises(ValueError):
        TaskManager(2, error_mode=value)


@pytest.mark.parametrize("value", [adder, "init", (adder,)])
def test_worker_init_must_be_a_task(value):
    with pytest.raises(TypeError):
        TaskManager(2, worker_init=value)


@pytest.mark.parametrize("kwargs, error", [
    ({"timeout": 0}, ValueError), ({"timeout": -1}, ValueError), ({"timeout": "1"}, TypeError),
    ({"max_tasks_per_child": 0}, ValueError), ({"max_tasks_per_child": -3}, ValueError),
    ({"max_tasks_per_child": 1.5}, TypeError), ({"max_tasks_per_child": "2"}, TypeError),
])
def test_timeout_and_max_tasks_per_child_validation(kwargs, error):
    with pytest.raises(error):
        TaskManager(2, **kwargs)


def test_timeout_and_max_tasks_per_child_are_keyword_only():
    with pytest.raises(TypeError):
        TaskManager(2, "spawn", None, "str", 5)


def test_valid_options_accepted():
    TaskManager(1, FAST_METHOD, Task(adder, 1, 2), "exception", timeout=2.5, max_tasks_per_child=1)


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------

def test_nothing_starts_in_init():
    before = {p for p, _, _ in descendant_processes()}
    TaskManager(2, context=FAST_METHOD)
    TaskManager(2, context="spawn")
    assert {p for p, _, _ in descendant_processes()} - before == set()


def test_context_manager_starts_and_stops(method, tmp_path):
    with TaskManager(2, context=method) as tm:
        assert isinstance(tm, TaskManager)
        pids = worker_pids(tm, tmp_path, 2)
        assert tm.execute([Task(adder, 1, 2)], progress=False) == [3]
    assert wait_gone(pids) == []
    with pytest.raises(RuntimeError):
        bounded(lambda: tm.execute([Task(adder, 1, 2)], progress=False))


def test_start_stop_idempotent_and_restart_gives_a_fresh_pool(method, tmp_path):
    tm = TaskManager(2, context=method)
    tm.stop()  # never started: a no-op
    tm.start()
    tm.start()  # already running: a no-op, same workers
    first = worker_pids(tm, tmp_path, 2)
    assert len(first) == 2 and worker_pids(tm, tmp_path, 2) == first
    tm.stop()
    tm.stop()
    assert wait_gone(first) == []
    tm.start()
    try:
        second = worker_pids(tm, tmp_path, 2)
        assert len(second) == 2 and not (second & first)
        assert tm.execute([Task(adder, i, 1) for i in range(10)], progress=False) == list(range(1, 11))
    finally:
        tm.stop()
    assert wait_gone(second) == []


def test_stop_returns_with_tasks_still_running(tmp_path):
    tm = TaskManager(2, context="spawn")
    tm.start()
    pids = worker_pids(tm, tmp_path, 2)
    for _ in range(4):
        tm.submit(Task(time.sleep, 600))
    bounded(tm.stop, 60)  # a stop that waited for the tasks would take 10 minutes
    assert wait_gone(pids) == []


NOT_RUNNING_CALLS = {
    "execute": lambda tm: tm.execute([Task(adder, 1, 2)], progress=False),
    "submit": lambda tm: tm.submit(Task(adder, 1, 2)),
    "take": lambda tm: tm.take(),
    "take_blocking": lambda tm: tm.take(timeout=None),
    "map": lambda tm: tm.map(double, [1, 2]),
    "as_completed": lambda tm: list(tm.as_completed()),
}


@pytest.mark.parametrize("state", ["never_started", "stopped"])
def test_calls_on_a_manager_that_is_not_running_raise(state):
    tm = TaskManager(2, context=FAST_METHOD)
    if state == "stopped":
        tm.start()
        tm.stop()
    for name, call in NOT_RUNNING_CALLS.items():
        with pytest.raises(RuntimeError):
            bounded(lambda: call(tm), 30)
            pytest.fail("%s did not raise" % name)


def test_worker_init_failure_makes_start_raise(tmp_path):
    tm = TaskManager(2, context="spawn", worker_init=Task(broken))
    with pytest.raises(RuntimeError) as info:
        bounded(tm.start, 60)
    assert "NotImplementedError: this task must fail!" in str(info.value)
    tm.stop()


# ---------------------------------------------------------------------------------------------
# execute
# ---------------------------------------------------------------------------------------------

def test_results_come_in_input_order(pool):
    # the first tasks are the slowest, so they finish last
    delays = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]
    tasks = [Task(sleep_return, d, i) for i, d in enumerate(delays)]
    assert pool.execute(tasks, progress=False) == list(range(len(delays)))


def test_args_and_kwargs_reach_the_function(pool):
    tasks = [Task(echo, 1, "two", a=3, b=[4]), Task(echo), Task(echo, key=None), Task(f, 0.0, hello=2)]
    assert pool.execute(tasks, progress=False) == [((1, "two"), {"a": 3, "b": [4]}), ((), {}),
                                                   ((), {"key": None}), 0.0]


def test_any_iterable_of_tasks(pool):
    assert pool.execute((Task(adder, i, i) for i in range(10)), progress=False) == [2 * i for i in range(10)]
    assert pool.execute(tuple(Task(double, i) for i in range(3)), progress=False) == [0, 2, 4]
    assert pool.execute(map(lambda i: Task(double, i), range(3)), progress=False) == [0, 2, 4]


def test_empty_execute_returns_empty_list(pool):
    assert pool.execute([]) == []
    assert pool.execute(iter([])) == []


@pytest.mark.parametrize("make_tasks", [
    lambda path: [Task(append_line, path, "ran"), 42],
    lambda path: [Task(append_line, path, "ran"), adder, Task(append_line, path, "ran")],
    lambda path: (t for t in [Task(append_line, path, "ran"), "not a task"]),
    lambda path: [Task(append_line, path, "ran"), None],
], ids=["int", "function", "generator", "None"])
def test_non_task_item_raises_before_anything_runs(tmp_path, make_tasks):
    path = str(tmp_path / "ran.txt")
    # one worker: whatever had been sent to it runs before the probe task below
    with TaskManager(1, context=FAST_METHOD) as tm:
        with pytest.raises(TypeError):
            tm.execute(make_tasks(path), progress=False)
        assert tm.execute([Task(file_exists, path)], progress=False) == [False]
    assert not os.path.exists(path)


@pytest.mark.parametrize("not_tasks", [42, "abc"], ids=["not_iterable", "str"])
def test_execute_of_a_non_iterable_or_str_raises_type_error(spool, not_tasks):
    with pytest.raises(TypeError):
        spool.execute(not_tasks, progress=False)


def test_same_pool_serves_many_execute_calls(pool):
    for i in range(20):
        assert pool.execute([Task(adder, i, j) for j in range(5)], progress=False) == [i + j for j in range(5)]


def test_many_tiny_tasks(pool):
    assert pool.execute([Task(adder, i, 1) for i in range(5000)], progress=False) == list(range(1, 5001))


def test_worker_init_runs_in_every_worker(method, tmp_path):
    init_dir = tmp_path / "init"
    init_dir.mkdir()
    with TaskManager(2, context=method, worker_init=Task(init_worker, str(init_dir))) as tm:
        folder = tempfile.mkdtemp(dir=str(tmp_path))
        reports = tm.execute([Task(report_worker, folder, 2) for _ in range(2)], progress=False)
    pids = {pid for pid, _, _ in reports}
    assert len(pids) == 2
    assert {"init-%d" % pid for pid in pids} <= set(os.listdir(str(init_dir)))
    for pid, env, state in reports:
        assert env == str(pid) and state == pid
    assert INIT_STATE is None and "MPLITE_TEST_INIT" not in os.environ  # init ran in workers only


# ---------------------------------------------------------------------------------------------
# error_mode="str"
# ---------------------------------------------------------------------------------------------

def assert_traceback_text(text, last_line):
    assert isinstance(text, str)
    assert text.startswith("Traceback (most recent call last):")
    assert text.splitlines()[-1] == last_line
    assert not text.endswith("\n")


def test_published_showcase():
    # the 1.x README's main(), with its prints turned into assertions
    args = list(range(10)) * 5
    with TaskManager() as tm:
        tasks = [Task(f, *(arg / 10,), **{'hello': arg}) for arg in args]
        assert str(tasks[0]) == repr(tasks[0]) == "Task(f=f, *(0.0,), **{'hello': 0})"
        results = tm.execute(tasks)
        assert len(results) == 50
        errors = [result for result in results if isinstance(result, str)]
        assert len(errors) == 5
        assert [i for i, r in enumerate(results) if isinstance(r, str)] == [i for i, a in enumerate(args) if a == 0]
        for error in errors:
            assert_traceback_text(error, "ZeroDivisionError: float division by zero")
        assert [r for r in results if not isinstance(r, str)] == pytest.approx([0.1] * 45)

        tasks = [Task(broken, *(i,)) for i in range(3)]
        results = tm.execute(tasks)
        assert len(results) == 3
        for result in results:
            assert_traceback_text(result, "NotImplementedError: this task must fail!")
            assert ", in broken" in result
            assert 'raise NotImplementedError("this task must fail!")' in result


def test_str_mode_failures_leave_other_tasks_alone(pool):
    args = list(range(10)) * 2
    tasks = [Task(f, arg / 100, hello=arg) for arg in args]
    tasks[5:5] = [Task(broken, 1)]
    tasks.append(Task(broken))
    results = pool.execute(tasks, progress=False)
    assert len(results) == len(tasks)
    assert_traceback_text(results[5], "NotImplementedError: this task must fail!")
    assert_traceback_text(results[-1], "NotImplementedError: this task must fail!")
    del results[-1], results[5]
    for arg, result in zip(args, results):
        if arg == 0:
            assert_traceback_text(result, "ZeroDivisionError: float division by zero")
        else:
            assert result == pytest.approx(0.01)


@pytest.mark.parametrize("func, args, text", [
    (raise_two_arg_error, ("x", "y"), "two-arg error x y"),
    (raise_lock_holding_error, ("holds a lock",), "holds a lock"),
])
def test_str_mode_unpicklable_exceptions(pool, func, args, text):
    results = pool.execute([Task(func, *args), Task(adder, 1, 2)], progress=False)
    assert results[1] == 3
    assert isinstance(results[0], str) and text in results[0]


# ---------------------------------------------------------------------------------------------
# error_mode="exception"
# ---------------------------------------------------------------------------------------------

def test_exception_mode_raises_with_worker_traceback_and_recovers(xpool, tmp_path):
    tasks = [Task(raise_value_error, "boom 42")] + [Task(sleep_return, 0.5, "stale") for _ in range(4)]
    with pytest.raises(ValueError, match="^boom 42$") as info:
        xpool.execute(tasks, progress=False)
    assert type(info.value) is ValueError

    frames = [fr for fr in traceback.extract_tb(info.value.__traceback__)
              if os.path.basename(fr.filename) == "test_mplite.py" and fr.name == "raise_value_error"]
    assert frames, traceback.format_tb(info.value.__traceback__)
    assert frames[-1].lineno == raise_lineno(raise_value_error, "raise ValueError")
    assert "raise ValueError(message)" in frames[-1].line

    assert xpool.open_tasks == 0
    # the aborted call's slow tasks finish during this call; none of their results may leak into it
    assert xpool.execute([Task(sleep_return, 0.2, i) for i in range(6)], progress=False) == list(range(6))
    assert xpool.execute([Task(adder, i, i) for i in range(4)], progress=False) == [0, 2, 4, 6]
    assert xpool.open_tasks == 0


def test_exception_mode_leaves_submitted_tasks_alone(xpool, tmp_path):
    gate = str(tmp_path / "gate")
    xpool.submit(Task(wait_for_file, gate, "submitted"))
    timer = open_gate_later(gate)  # the execute's tasks may have been queued behind the gated one
    with pytest.raises(ZeroDivisionError):
        xpool.execute([Task(f, 0.0, hello=0), Task(adder, 1, 2)], progress=False)
    assert xpool.open_tasks == 1
    timer.join()
    assert xpool.take(timeout=60) == "submitted"
    assert xpool.open_tasks == 0


@pytest.mark.parametrize("func, args, type_name, text", [
    (raise_two_arg_error, ("x", "y"), "TwoArgError", "two-arg error x y"),
    (raise_lock_holding_error, ("holds a lock",), "LockHoldingError", "holds a lock"),
])
def test_exception_mode_unpicklable_exceptions_reach_the_caller(xpool, func, args, type_name, text):
    with pytest.raises(Exception) as info:
        bounded(lambda: xpool.execute([Task(func, *args)], progress=False))
    assert text in str(info.value)
    if type(info.value).__name__ != type_name:  # not rebuilt: a RuntimeError naming the type
        assert type(info.value) is RuntimeError and type_name in str(info.value)
    assert xpool.execute([Task(adder, 1, 2)], progress=False) == [3]


def test_exception_mode_take_and_as_completed_raise(xpool):
    xpool.submit(Task(raise_value_error, "from take"))
    with pytest.raises(ValueError, match="from take"):
        xpool.take(timeout=60)
    assert xpool.open_tasks == 0
    xpool.submit(Task(raise_value_error, "from as_completed"))
    with pytest.raises(ValueError, match="from as_completed"):
        list(xpool.as_completed(timeout=60))
    assert xpool.open_tasks == 0


# ---------------------------------------------------------------------------------------------
# submit / take / as_completed / open_tasks / map
# ---------------------------------------------------------------------------------------------

def test_readme_incremental_workload():
    # the 1.x README's example, verbatim but for the prints
    with TaskManager() as tm:
        # 1. create initial workload
        checksum = 55
        for a in range(1, 10, 2):
            t = Task(adder, a, a + 1)
            tm.submit(t)

        # 2. create incremental workload
        a, b = None, None
        while True:
            result = tm.take()
            if result is None:
                if tm.open_tasks == 0:
                    break
                else:
                    continue

            if a is None:
                a = result
            else:
                b = result

            if a and b:
                t = Task(adder, a, b)
                tm.submit(t)
                a, b = None, None

        assert a == checksum or b == checksum, (a, b, checksum)


def test_incremental_workload_with_blocking_take(pool):
    for a in range(1, 10, 2):
        pool.submit(Task(adder, a, a + 1))
    pending, rounds = None, 0
    while pool.open_tasks:
        result = pool.take(timeout=60)
        assert result is not None
        rounds += 1
        if pending is None:
            pending = result
        else:
            pool.submit(Task(adder, pending, result))
            pending = None
    assert (pending, rounds) == (55, 9)


def test_take_returns_none_when_nothing_is_ready(pool, tmp_path):
    assert pool.take() is None
    assert pool.take(timeout=0.2) is None
    assert bounded(lambda: pool.take(timeout=None), 30) is None  # open_tasks == 0: at once
    gate = str(tmp_path / "gate")
    pool.submit(Task(wait_for_file, gate, "opened"))
    assert pool.take() is None
    assert pool.take(timeout=0.3) is None
    assert pool.open_tasks == 1
    open(gate, "w").close()
    assert pool.take(timeout=60) == "opened"
    assert pool.open_tasks == 0


def test_take_blocking_waits_for_a_result(pool):
    pool.submit(Task(sleep_return, 0.3, "late"))
    assert bounded(lambda: pool.take(timeout=None), 60) == "late"


def test_submit_returns_task_id_and_open_tasks_counts(pool, tmp_path):
    gate = str(tmp_path / "gate")
    tasks = [Task(wait_for_file, gate, i) for i in range(3)]
    assert [pool.submit(t) for t in tasks] == [t.id for t in tasks]
    assert pool.open_tasks == 3
    open(gate, "w").close()
    seen = []
    for left in (2, 1, 0):
        seen.append(pool.take(timeout=60))
        assert pool.open_tasks == left
    assert sorted(seen) == [0, 1, 2]


def test_execute_does_not_touch_submitted_tasks(pool, tmp_path):
    gate = str(tmp_path / "gate")
    pool.submit(Task(wait_for_file, gate, "submitted"))
    timer = open_gate_later(gate)  # the execute's tasks may have been queued behind the gated one
    assert pool.execute([Task(adder, i, i) for i in range(8)], progress=False) == [2 * i for i in range(8)]
    assert pool.open_tasks == 1
    timer.join()
    assert pool.take(timeout=60) == "submitted"
    assert pool.open_tasks == 0


def test_execute_is_not_held_up_by_one_busy_worker(spool, tmp_path):
    # One worker is busy with a submitted task that ends only when the gate opens (or after 30 s).
    # The other worker is free, so the execute must finish without waiting for that task: none of
    # its tasks may be left queued behind the busy worker.
    gate = str(tmp_path / "gate")
    spool.submit(Task(wait_for_file, gate, "submitted", 30))
    try:
        assert spool.execute([Task(adder, i, i) for i in range(8)], progress=False) == [2 * i for i in range(8)]
        assert spool.take() is None, "the execute waited for the busy worker's task to end"
    finally:
        open(gate, "w").close()
    assert spool.take(timeout=60) == "submitted"


def test_as_completed_yields_the_submitted_tasks(pool):
    tasks = [Task(adder, 1, 2), Task(return_none), Task(sleep_return, 0.2, "slow"), Task(broken)]
    for t in tasks:
        pool.submit(t)
    pairs = list(pool.as_completed(timeout=60))
    assert pool.open_tasks == 0
    assert sorted(id(t) for t, _ in pairs) == sorted(id(t) for t in tasks)  # the very objects
    results = {t.id: r for t, r in pairs}
    assert results[tasks[0].id] == 3
    assert results[tasks[1].id] is None
    assert results[tasks[2].id] == "slow"
    assert_traceback_text(results[tasks[3].id], "NotImplementedError: this task must fail!")


def test_as_completed_timeout(pool, tmp_path):
    gate = str(tmp_path / "gate")
    pool.submit(Task(wait_for_file, gate, "gated"))
    with pytest.raises(TimeoutError):
        list(pool.as_completed(timeout=0.3))
    assert pool.open_tasks == 1
    open(gate, "w").close()
    assert [r for _, r in pool.as_completed(timeout=60)] == ["gated"]


@pytest.mark.parametrize("not_a_task", [adder, 42, None, (adder, 1)])
def test_submit_of_a_non_task_raises_type_error(spool, not_a_task):
    with pytest.raises(TypeError):
        spool.submit(not_a_task)
    assert spool.open_tasks == 0


def test_unpicklable_tasks_are_refused_and_queued_work_survives(pool, tmp_path):
    lock = threading.Lock()

    def local_function():
        return lock.locked()  # a closure over a lock: it can't travel, even by value

    gate = str(tmp_path / "gate")
    queued = Task(wait_for_file, gate, "queued")
    pool.submit(queued)
    bad_tasks = [(Task(lambda: lock), "<lambda>"), (Task(local_function), "local_function"),
                 (Task(adder, threading.Lock(), 1), "adder")]
    for bad, name in bad_tasks:
        with pytest.raises(TypeError) as info:
            pool.submit(bad)
        assert isinstance(info.value, pickle.PicklingError)
        assert name in str(info.value)
    with pytest.raises(TypeError) as info:
        pool.execute([Task(adder, 1, 2), Task(lambda: lock)], progress=False)
    assert isinstance(info.value, pickle.PicklingError) and "<lambda>" in str(info.value)
    assert "closure variable 'lock'" in str(info.value), str(info.value)
    assert pool.open_tasks == 1
    open(gate, "w").close()
    assert pool.take(timeout=60) == "queued"
    assert pool.execute([Task(adder, 1, 2)], progress=False) == [3]


def test_map(pool):
    assert pool.map(double, range(10)) == [2 * i for i in range(10)]
    assert pool.map(double, []) == []
    assert pool.map(echo, ["a", "b"]) == [(("a",), {}), (("b",), {})]


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

FINAL_BAR = re.compile(r"100%\|[^|]*\| 20/20 \[\d\d:\d\d<\d\d:\d\d, *[\d.]+tasks/s\]")


class RecordingBar:
    def __init__(self):
        self.n, self.closed = 0, False

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


class FakeTqdm:
    instances = []

    def __init__(self, total=None, unit=None):
        self.total, self.unit, self.n, self.closed = total, unit, 0, False
        FakeTqdm.instances.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_bar_on_stderr(spool, capfd):
    assert spool.execute([Task(adder, i, i) for i in range(20)]) == [2 * i for i in range(20)]
    out, err = capfd.readouterr()
    assert FINAL_BAR.search(err), repr(err)
    assert out == ""


def test_progress_false_writes_nothing(spool, capfd):
    spool.execute([Task(adder, i, i) for i in range(20)], progress=False)
    assert capfd.readouterr() == ("", "")


def test_progress_bar_is_short_when_stderr_is_not_a_terminal(spool, capfd):
    spool.execute([Task(adder, i, i) for i in range(2000)])
    err = capfd.readouterr().err
    assert re.search(r"100%\|[^|]*\| 2000/2000 ", err), repr(err)
    assert len(re.split(r"[\r\n]+", err.strip())) <= 5, repr(err)


def test_pbar_receives_updates_and_is_not_closed(spool, capfd):
    bar = RecordingBar()
    assert spool.execute([Task(adder, i, i) for i in range(7)], pbar=bar) == [2 * i for i in range(7)]
    assert bar.n == 7 and bar.closed is False
    assert capfd.readouterr().err == ""


def test_tqdm_class_is_instantiated_and_closed(spool, capfd):
    FakeTqdm.instances.clear()
    assert spool.execute([Task(adder, i, i) for i in range(9)], tqdm=FakeTqdm) == [2 * i for i in range(9)]
    [bar] = FakeTqdm.instances
    assert (bar.total, bar.unit, bar.n, bar.closed) == (9, "tasks", 9, True)
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# The engine: big payloads both ways, dead workers
# ---------------------------------------------------------------------------------------------

def test_large_payloads_both_ways_at_once(pool):
    data = bytes(range(256)) * (50 * 1024 * 1024 // 256)  # 50 MB
    tasks = [Task(echo_bytes, i, data) for i in range(5)]
    results = bounded(lambda: pool.execute(tasks, progress=False), 110)
    assert [tag for tag, _ in results] == list(range(5))
    assert all(echoed == data for _, echoed in results)


@posix_only("a worker killed by SIGKILL, named in its task's error")
def test_sigkilled_worker_is_reported_and_replaced(method, tmp_path):
    pid_file = str(tmp_path / "killed.pid")
    kill = Task(kill_self, pid_file)
    tasks = [Task(sleep_return, 0.05, i) for i in range(8)]
    tasks.insert(3, kill)
    with TaskManager(2, context=method) as tm:
        results = tm.execute(tasks, progress=False)
        error = results.pop(3)
        assert results == list(range(8))
        assert isinstance(error, str)
        # the task's repr may be shortened; its start names the function
        assert "SIGKILL" in error and "possibly out of memory" in error and "Task(f=kill_self" in error, error
        with open(pid_file) as fh:
            killed = int(fh.read())
        pids = pids_seen_eventually(tm, 2)  # the replacement may still be booting
        assert len(pids) == 2 and killed not in pids

# ---------------------------------------------------------------------------------------------
# Engine: what batching must not change
# ---------------------------------------------------------------------------------------------

def word_record(i):
    word = "w%d" % i
    return {"word": word, "tokens": [word, word], "same": (word,) * 3}


def test_results_sharing_objects_inside_come_back_intact(pool):
    # Results that hold the same object twice are pickled with references inside; batched results
    # travel together, and each must still come back as its own, whole value.
    assert pool.map(word_record, range(3000)) == [word_record(i) for i in range(3000)]


CHAIN_LOCK = threading.Lock()


def chain_to_lambda(prev_task, result):
    return Task(lambda: (result, CHAIN_LOCK))  # uses a lock: it can't travel, and the chain fails here


def test_a_chain_step_that_cant_be_pickled_fails_alone(pools):
    tm = pools.get(FAST_METHOD)
    try:
        tm.submit(TaskChain(Task(adder, 1, 2), chain_to_lambda))
        assert tm.execute([Task(adder, i, 1) for i in range(20)], progress=False) == list(range(1, 21))
        result = tm.take(timeout=60)
        assert "can't be sent to a worker process" in result and "lambda" in result, result
        assert tm.open_tasks == 0
    finally:
        pools.release(tm)


def raise_on(x, bad):
    if x == bad:
        raise KeyError(x)
    return x


def record_step(prev_task, result, log):
    with open(log, "a") as f:
        f.write("%s\n" % result)


def _refuse_to_unpickle():
    raise ValueError("cannot be rebuilt in the worker")


class BuiltOnlyHere:
    """Pickles fine, but fails to unpickle: a message holding it can't be read by the worker."""
    def __reduce__(self):
        return (_refuse_to_unpickle, ())


def test_a_task_the_worker_cant_unpickle_fails_alone(pool):
    results = pool.execute([Task(adder, 1, 1), Task(adder, BuiltOnlyHere(), 1), Task(adder, 2, 2)],
                           progress=False)
    assert results[0] == 2 and results[2] == 4
    assert results[1].splitlines()[-1] == "ValueError: cannot be rebuilt in the worker", results[1]
    pool.submit(Task(adder, BuiltOnlyHere(), 1))
    assert pool.take(timeout=60).splitlines()[-1] == "ValueError: cannot be rebuilt in the worker"


def nap_return(seconds, value):
    time.sleep(seconds)
    return value


def test_an_aborted_execute_runs_no_more_chain_steps(xpool, tmp_path):
    log = str(tmp_path / "steps")
    chains = [TaskChain(Task(nap_return, 0.3, i), functools.partial(record_step, log=log)) for i in range(4)]
    with pytest.raises(KeyError):
        xpool.execute([Task(raise_on, 0, 0)] + chains, progress=False)
    # Each worker answers in order: once these are back, so are the chains' first steps.
    assert xpool.execute([Task(nap_return, 0.5, 7)] * 4, progress=False) == [7] * 4
    assert not os.path.exists(log), open(log).read()


# =============================================================================================
# Fault injection: dead workers, timeouts, unpicklable data, Ctrl-C, a dying parent, a soak.
#
# Every manager made by _fault_pool gets a worker_init that appends the worker's pid to a file
# in the test's tmp_path: the pids in that file still running are exactly that pool's live,
# initialised workers, whatever other pools exist, and the file proves that worker_init runs
# again in replacement workers. Calls that could hang run under SIGALRM deadlines
# (_fault_deadline) or subprocess timeouts.
# =============================================================================================

_FAULT_REPO = os.path.dirname(os.path.abspath(__file__))
_FAULT_METHODS = where_available(["spawn", "fork"])
# How _fault_die ends its worker. On Windows: killed from outside (TerminateProcess, kill_hard), and
# os._exit(3); a crash's exit code there (an NTSTATUS) is mplite's to name, and is not checked here.
_FAULT_KINDS = ["TerminateProcess", "exit3"] if WINDOWS else ["SIGKILL", "SIGSEGV", "exit3", "SIGABRT"]
_HARD_KILL = _FAULT_KINDS[0]  # the kind that kill_hard() is
_FAULT_SINGLETONS = MULTIPROCESSING_SINGLETONS
_FAULT_SEEN_PIDS = set()  # every worker pid any test here has seen; all must be gone at the end


# ---------------------------------------------------------------------------------------------
# Task functions (module level, picklable)
# ---------------------------------------------------------------------------------------------

def _fault_append(path, line):
    """Append one line with a single O_APPEND write (atomic between processes). On Windows O_APPEND
    is a seek to the end, then a write: there the writers take turns, under a lock."""
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if WINDOWS:
            _win_locked_append(fd, (line + "\n").encode())
        else:
            os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _win_locked_append(fd, data):
    """Write data at the end of fd's file under a lock of one byte far past its end, which no reader
    of the file touches; Windows drops the lock of a process that dies holding it."""
    import msvcrt
    lock_at = (1 << 31) - 2
    os.lseek(fd, lock_at, os.SEEK_SET)
    deadline = time.monotonic() + 60
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, data)
    finally:
        os.lseek(fd, lock_at, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _fault_init_record(path):
    _fault_append(path, str(os.getpid()))


def _fault_init_raise(path, message):
    _fault_append(path, str(os.getpid()))
    raise ValueError(message)


def _fault_init_exit(path):
    _fault_append(path, str(os.getpid()))
    os._exit(1)


def _fault_work(i, delay=0.0, log=None):
    if log:
        _fault_append(log, str(i))
    if delay:
        time.sleep(delay)
    return i * 10 + 1


def _fault_work_pid(i, log):
    _fault_append(log, "%d %d" % (i, os.getpid()))
    return i * 10 + 1, os.getpid()


def _fault_identity(*args, **kwargs):
    return args, kwargs


def _fault_sleep(seconds, value):
    time.sleep(seconds)
    return value


def _fault_tiny(i, bad=-1):
    if i == bad:
        raise ValueError("bad-%d" % i)
    return i * 3


def _fault_tiny_logged(i, log, die_at=-1, slow_at=-1):
    if i == die_at:
        kill_hard(os.getpid())
        time.sleep(10)
    if i == slow_at:
        time.sleep(20)
    _fault_append(log, str(i))
    return i * 3


def _fault_square(i):
    return i * i


def _fault_soak_task(i, log):
    _fault_append(log, str(i))
    time.sleep(0.0005)
    return i * 7 + 3


def _fault_die(kind, pid_file=None):
    """Kill the worker running this task, in the way `kind` says."""
    if pid_file:
        _fault_append(pid_file, str(os.getpid()))
    if resource is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files anywhere
    faulthandler.disable()  # fork workers inherit pytest's faulthandler; keep their stderr quiet
    if kind in ("SIGKILL", "TerminateProcess"):
        kill_hard(os.getpid())
    elif kind == "SIGSEGV":
        ctypes.string_at(0)
    elif kind == "exit3":
        os._exit(3)
    elif kind == "SIGABRT":
        os.abort()
    time.sleep(10)
    return "survived %s" % kind


def _fault_freeze():
    os.kill(os.getpid(), signal.SIGSTOP)  # a hung worker: stopped, not dead
    return "thawed"


def _fault_big_result_then_die(n_bytes, delay):
    """Return a large result, and SIGKILL this worker `delay` s later: before, while or after the
    result travels to the parent (the test sweeps delays; every outcome must be handled)."""
    def kill_later():
        time.sleep(delay)
        kill_hard(os.getpid())
    data = b"x" * n_bytes
    threading.Thread(target=kill_later, daemon=True).start()
    return data


def _fault_sys_exit(code):
    sys.exit(code)


def _fault_marker_sleep(folder, seconds):
    open(os.path.join(folder, "%d.started" % os.getpid()), "w").close()
    time.sleep(seconds)
    return seconds


def _fault_return_lambda():
    return lambda: 1


def _fault_return_lock():
    return threading.Lock()


class _FaultLockedError(Exception):
    """Can't be pickled: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class _FaultTwoArgError(Exception):
    """Pickles, but can't be rebuilt: unpickling calls _FaultTwoArgError(message) -> missing argument."""

    def __init__(self, a, b):
        super().__init__("two-arg-failure %s %s" % (a, b))


def _fault_raise_locked(message):
    raise _FaultLockedError(message)


def _fault_raise_two_arg(a, b):
    raise _FaultTwoArgError(a, b)


def _fault_next_none(prev_task, result):  # TaskChain next_task: end the chain
    return None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class _FaultHang(BaseException):
    """Raised by _fault_deadline when a call does not return in time (a hang, not slowness)."""


@contextlib.contextmanager
def _fault_deadline(seconds, what="the call"):
    """Interrupt the main thread with _FaultHang if the block takes longer than `seconds`."""
    if not hasattr(signal, "SIGALRM"):  # Windows: a timer thread interrupts the main thread
        with _fault_deadline_by_timer(seconds, what):
            yield
        return

    def on_alarm(signum, frame):
        raise _FaultHang("hang: %s had not returned after %s s" % (what, seconds))

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _fault_deadline_by_timer(seconds, what):
    """_fault_deadline where there is no SIGALRM: a KeyboardInterrupt that the timer sent (mplite's
    callers wait in slices, so it arrives) becomes the _FaultHang."""
    fired = threading.Event()

    def fire():
        fired.set()
        _thread.interrupt_main()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except KeyboardInterrupt:
        if fired.is_set():
            raise _FaultHang("hang: %s had not returned after %s s" % (what, seconds)) from None
        raise
    finally:
        timer.cancel()


def _fault_lines(path):
    try:
        with open(str(path)) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []


def _fault_pids_in(path):
    pids = {int(x.split()[0]) for x in _fault_lines(path) if x.strip()}
    _FAULT_SEEN_PIDS.update(pids)
    return pids


_fault_alive = pid_running


def _fault_wait_dead(pids, limit, what):
    """Bounded poll until none of pids runs; fail (naming them) otherwise."""
    pids = set(pids)
    _FAULT_SEEN_PIDS.update(pids)
    deadline = time.monotonic() + limit
    while any(_fault_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = sorted(p for p in pids if _fault_alive(p))
    assert not alive, "%s: pids still running after %s s: %s" % (what, limit, alive)


def _fault_live_workers(init_path):
    return {p for p in _fault_pids_in(init_path) if _fault_alive(p)}


def _fault_wait_pool(tm, init_path, n_workers, exact_inits=None, min_inits=None, exclude=(), limit=30):
    """Bounded poll until the pool has exactly n_workers live, initialised workers (none of
    `exclude`), and its worker_init ran exact_inits / at least min_inits times. Returns the pids.

    The manager is given a one-task execute() per round: mplite's engine runs inside the calls made
    to it (no thread of its own), so a replacement worker is started during the next call."""
    deadline = time.monotonic() + limit
    while True:
        inits = _fault_lines(init_path)
        live = _fault_live_workers(init_path)
        ok = (len(live) == n_workers and not live & set(exclude)
              and (exact_inits is None or len(inits) == exact_inits)
              and (min_inits is None or len(inits) >= min_inits))
        if ok:
            return live
        if time.monotonic() > deadline:
            pytest.fail("pool did not get back to %d live initialised workers within %s s: live=%s, "
                        "worker_init ran %d times (expected %s), excluded/dead pids=%s"
                        % (n_workers, limit, sorted(live), len(inits),
                           exact_inits if exact_inits is not None else ">= %s" % min_inits,
                           sorted(exclude)))
        with _fault_deadline(30, "a one-task execute"):
            assert tm.execute([Task(_fault_work, 0)], progress=False) == [1]
        time.sleep(0.05)


@contextlib.contextmanager
def _fault_pool(method, init_path, cpu_count=2, **kwargs):
    """A started manager whose workers record their pids in init_path; stopped (bounded) on exit,
    after which every worker it ever had must be gone."""
    tm = TaskManager(cpu_count=cpu_count, context=method,
                     worker_init=Task(_fault_init_record, str(init_path)), **kwargs)
    with _fault_deadline(60, "start()"):
        tm.start()
    try:
        yield tm
    finally:
        with _fault_deadline(30, "stop()"):
            tm.stop()
        _fault_wait_dead(_fault_pids_in(init_path), 10, "workers after stop()")


def _fault_check_error_str(res, *needles):
    assert isinstance(res, str), "expected an error string, got %r" % (res,)
    assert res.startswith("Traceback (most recent call last):"), res
    assert not res.endswith("\n"), repr(res[-80:])
    for needle in needles:
        assert needle in res, "%r not in error text:\n%s" % (needle, res)
    return res.splitlines()[-1]


def _fault_check_death_text(text, kind):
    """The text of a task whose worker died: names the task and the cause (on Windows, for a worker
    killed from outside, the task only: see KILLED)."""
    assert "_fault_die" in text, "the error does not name the task:\n%s" % text
    if kind == "TerminateProcess":
        pass
    elif kind == "SIGKILL":
        assert "SIGKILL" in text, text
        assert "possibly out of memory" in text, text
    elif kind in ("SIGSEGV", "SIGABRT"):
        assert kind in text, text
    elif kind == "exit3":
        assert re.search(r"exit", text, re.I) and re.search(r"\b3\b", text), text
    else:  # pragma: no cover
        raise AssertionError(kind)


def _fault_check_death_str(res, kind):
    last = _fault_check_error_str(res)
    assert last.startswith("ChildProcessError"), res
    _fault_check_death_text(res, kind)


def _fault_proc_table(with_pgrp=False):
    """{pid: (ppid, state)} (or (ppid, state, pgrp)) of every process, from /proc where there is one,
    else from ps; on Windows from a snapshot, with pgrp None (it has no process groups)."""
    if WINDOWS:
        return {pid: (ppid, state) + ((None,) if with_pgrp else ())
                for pid, (ppid, state, _) in _win_process_table().items()}
    if not PROCFS:
        ps_pid, out = _ps("-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat=")
        table = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 4 and int(fields[0]) != ps_pid:  # not ps itself, a child of ours
                table[int(fields[0])] = (int(fields[1]), fields[3][0]) + ((int(fields[2]),) if with_pgrp else ())
        return table
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(name)] = (int(fields[1]), fields[0]) + ((int(fields[2]),) if with_pgrp else ())
    return table


_fault_cmdline = _cmdline


def _fault_descendants(root=None):
    """{pid: state} of every descendant of root (default: this process), zombies included, walking
    through (but not listing) multiprocessing's own singletons (resource tracker, forkserver)."""
    root = os.getpid() if root is None else root
    table = _fault_proc_table()
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if not any(m in _fault_cmdline(pid) for m in _FAULT_SINGLETONS):
            found[pid] = table[pid][1]
    return found


def _fault_wait_files(folder, suffix, n, limit=60):
    deadline = time.monotonic() + limit
    while True:
        names = [x for x in os.listdir(str(folder)) if x.endswith(suffix)]
        if len(names) >= n:
            return names
        if time.monotonic() > deadline:
            pytest.fail("only %d of %d %s files in %s after %s s" % (len(names), n, suffix, folder, limit))
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# 1. A worker dies mid-task; sys.exit inside a task
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", where_available(_FAULT_METHODS + ["forkserver"]))
def test_fault_worker_death_str_mode(fault_method, tmp_path):
    init, dead = tmp_path / "init.txt", tmp_path / "dead.txt"
    with _fault_pool(fault_method, init) as tm:
        # SIGKILL, segfault, os._exit(3), abort (_FAULT_KINDS): each in the middle of good tasks
        tasks, kinds_at, i = [], {}, 0
        for kind in _FAULT_KINDS:
            for _ in range(3):
                tasks.append(Task(_fault_work, i, 0.02))
                i += 1
            kinds_at[len(tasks)] = kind
            tasks.append(Task(_fault_die, kind, str(dead)))
        tasks += [Task(_fault_work, i + k, 0.02) for k in range(3)]
        with _fault_deadline(60, "execute"):
            res = tm.execute(tasks, progress=False)
        assert len(res) == len(tasks)
        for at, kind in kinds_at.items():
            _fault_check_death_str(res[at], kind)
        assert [r for k, r in enumerate(res) if k not in kinds_at] == [j * 10 + 1 for j in range(i + 3)]

        # the same through submit / as_completed, with open_tasks tracked
        ok_ids = {tm.submit(Task(_fault_work, 100 + k, 0.02)): 100 + k for k in range(3)}
        die_ids = {tm.submit(Task(_fault_die, kind, str(dead))): kind for kind in _FAULT_KINDS}
        assert tm.open_tasks == 3 + len(_FAULT_KINDS)
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                assert task.id not in got
                got[task.id] = result
        assert tm.open_tasks == 0
        assert set(got) == set(ok_ids) | set(die_ids)
        for tid, k in ok_ids.items():
            assert got[tid] == k * 10 + 1
        for tid, kind in die_ids.items():
            _fault_check_death_str(got[tid], kind)

        dead_pids = _fault_pids_in(dead)
        assert len(dead_pids) == 2 * len(_FAULT_KINDS)
        # the pool keeps 2 workers: the dead ones were replaced and worker_init ran in the new ones
        _fault_wait_pool(tm, init, 2, exact_inits=2 + len(dead_pids), exclude=dead_pids)
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, k) for k in range(10)], progress=False) == \
                [k * 10 + 1 for k in range(10)]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_worker_death_exception_mode(fault_method, tmp_path):
    init, dead = tmp_path / "init.txt", tmp_path / "dead.txt"
    with _fault_pool(fault_method, init, error_mode="exception") as tm:
        queued = {tm.submit(Task(_fault_work, 50 + k, 0.02)): 50 + k for k in range(3)}
        for kind in _FAULT_KINDS:
            tasks = [Task(_fault_work, 1), Task(_fault_die, kind, str(dead)), Task(_fault_work, 2)]
            with _fault_deadline(60, "execute"):
                with pytest.raises(ChildProcessError) as excinfo:
                    tm.execute(tasks, progress=False)
            _fault_check_death_text(str(excinfo.value), kind)
            assert tm.open_tasks == 3, "a failed execute changed open_tasks"
            with _fault_deadline(60, "execute"):  # usable, and no stale results
                assert tm.execute([Task(_fault_work, i) for i in range(5)], progress=False) == \
                    [i * 10 + 1 for i in range(5)]
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got[task.id] = result
        assert got == {tid: k * 10 + 1 for tid, k in queued.items()}
        # take() raises it too, and the task counts as taken
        tm.submit(Task(_fault_die, _HARD_KILL, str(dead)))
        with _fault_deadline(60, "take"):
            with pytest.raises(ChildProcessError, match=KILLED if not WINDOWS else None):
                tm.take(timeout=None)
        assert tm.open_tasks == 0
        dead_pids = _fault_pids_in(dead)
        assert len(dead_pids) == len(_FAULT_KINDS) + 1
        _fault_wait_pool(tm, init, 2, min_inits=2 + len(dead_pids), exclude=dead_pids)


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_sys_exit_is_an_ordinary_task_error(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init) as tm:
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(_fault_work, 0), Task(_fault_sys_exit, 42), Task(_fault_work, 1),
                              Task(_fault_sys_exit, 0), Task(_fault_work, 2)], progress=False)
        assert [res[0], res[2], res[4]] == [1, 11, 21]
        assert _fault_check_error_str(res[1]).startswith("SystemExit"), res[1]
        assert "42" in res[1].splitlines()[-1], res[1]
        assert _fault_check_error_str(res[3]).startswith("SystemExit"), res[3]
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]
        # the workers survived: no replacement happened
        assert len(_fault_lines(init)) == 2
        assert len(_fault_live_workers(init)) == 2

    init2 = tmp_path / "init2.txt"
    with _fault_pool(fault_method, init2, error_mode="exception") as tm:
        with _fault_deadline(60, "execute"):
            with pytest.raises(SystemExit) as excinfo:
                tm.execute([Task(_fault_work, 0), Task(_fault_sys_exit, 42)], progress=False)
        assert excinfo.value.code == 42
        with _fault_deadline(60, "execute"):
            with pytest.raises(SystemExit) as excinfo:
                tm.execute([Task(_fault_sys_exit, 0)], progress=False)
        assert excinfo.value.code == 0
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]
        assert len(_fault_lines(init2)) == 2
        assert len(_fault_live_workers(init2)) == 2


@pytest.mark.parametrize("fault_method,rounds", where_available([("spawn", 3), ("fork", 10)]))
def test_fault_idle_workers_killed_from_outside(fault_method, rounds, tmp_path):
    """Workers SIGKILLed while idle (say, by the OOM killer) ran no task: they must cost none.

    Each round kills both idle workers and calls execute() right away, so the engine may send work
    before it has noticed the deaths: tasks that never started must be run elsewhere, not charged."""
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init) as tm:
        killed = set()
        for r in range(rounds):
            pids = _fault_wait_pool(tm, init, 2, exact_inits=2 + 2 * r, exclude=killed)
            for pid in pids:
                kill_hard(pid)
            killed |= pids
            with _fault_deadline(60, "execute after idle workers were killed"):
                res = tm.execute([Task(_fault_work, i, 0.01) for i in range(6)], progress=False)
            assert res == [i * 10 + 1 for i in range(6)], \
                "round %d: a task that never started was charged with an idle worker's death: %r" % (r, res)
        _fault_wait_dead(killed, 10, "killed idle workers")
        _fault_wait_pool(tm, init, 2, exact_inits=2 + 2 * rounds, exclude=killed)


@posix_only("a worker stopped by SIGSTOP")
@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_frozen_workers(fault_method, tmp_path):
    """A worker stopped with SIGSTOP neither answers nor dies: a timeout and stop() must still work."""
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init) as tm:
        with _fault_deadline(60, "execute with a frozen worker"):
            res = tm.execute([Task(_fault_freeze), Task(_fault_work, 1)], progress=False, timeout=1.0)
        assert _fault_check_error_str(res[0]).startswith("TimeoutError"), res[0]
        assert res[1] == 11
        pids = _fault_wait_pool(tm, init, 2, exact_inits=3)
        tm.submit(Task(_fault_freeze))
        tm.submit(Task(_fault_freeze))
        deadline = time.monotonic() + 30
        while not any(_fault_proc_table().get(p, (0, "?"))[1] == "T" for p in pids):
            assert time.monotonic() < deadline, "no worker froze"
            with _fault_deadline(30, "take(timeout=0.05)"):
                assert tm.take(timeout=0.05) is None
        # leaving the with block: stop() with a frozen worker (bounded by _fault_pool)
    _fault_wait_dead(pids, 10, "frozen workers after stop()")


@pytest.mark.parametrize("fault_method,delays", where_available([("spawn", (0.15, 0.3)),
                                                                 ("fork", (0.0, 0.1, 0.15, 0.2, 0.25, 0.35))]))
def test_fault_worker_dies_while_sending_a_large_result(fault_method, delays, tmp_path):
    n = 100 * 1000 * 1000
    with _fault_pool(fault_method, tmp_path / "init.txt") as tm:
        for delay in delays:
            with _fault_deadline(60, "execute (delay %s)" % delay):
                res = tm.execute([Task(_fault_work, 1), Task(_fault_big_result_then_die, n, delay),
                                  Task(_fault_work, 2)], progress=False)
            assert res[0] == 11 and res[2] == 21
            if isinstance(res[1], str):  # died before the whole result was through: its error
                _fault_check_error_str(res[1], KILLED, "_fault_big_result_then_die")
            else:  # or the result got through intact
                assert isinstance(res[1], bytes) and len(res[1]) == n and res[1] == b"x" * n
            res = None
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_exception_mode_cancelled_call_leaves_no_stale_results(fault_method, tmp_path):
    """execute() raises at the first failure while other tasks of that call still run: their late
    results must not show up in the next call, nor in take()."""
    with _fault_pool(fault_method, tmp_path / "init.txt", error_mode="exception") as tm:
        sub = tm.submit(Task(_fault_sleep, 0.5, "submitted"))
        with _fault_deadline(60, "execute"):
            with pytest.raises(ValueError, match="^bad-0$"):
                tm.execute([Task(_fault_sleep, 0.6, "stale-a"), Task(_fault_tiny, 0, 0),
                            Task(_fault_sleep, 0.6, "stale-b"), Task(_fault_sleep, 0.6, "stale-c")],
                           progress=False)
        assert tm.open_tasks == 1
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_sleep, 0.3, "fresh-%d" % i) for i in range(4)], progress=False) == \
                ["fresh-%d" % i for i in range(4)]
        got = []
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got.append((task.id, result))
        assert got == [(sub, "submitted")]
        assert tm.open_tasks == 0
        with _fault_deadline(10, "take"):
            assert tm.take(timeout=0.5) is None


def test_fault_workers_killed_while_booting(tmp_path):
    """spawn workers take a while to boot: SIGKILL the first two as soon as they exist, before they
    are ready. start() must still give a working pool (killed from outside: start others).
    (On Windows, where the command line can't be read, every new child is a booting worker.)"""
    init = tmp_path / "init.txt"
    before = set(_fault_descendants())
    killed, stop = [], threading.Event()

    def killer():
        deadline = time.monotonic() + 30
        while not stop.is_set() and len(killed) < 2 and time.monotonic() < deadline:
            for pid, state in _fault_descendants().items():
                if (pid not in before and pid not in killed and state not in ("Z", "X") and len(killed) < 2
                        and (WINDOWS or "multiprocessing.spawn" in _fault_cmdline(pid))):  # a spawn worker, booting
                    with contextlib.suppress(PROCESS_GONE):
                        kill_hard(pid)
                        killed.append(pid)
            time.sleep(0.002)

    thread = threading.Thread(target=killer, daemon=True)
    tm = TaskManager(cpu_count=2, context="spawn", worker_init=Task(_fault_init_record, str(init)))
    thread.start()
    try:
        with _fault_deadline(60, "start() while its workers are killed"):
            tm.start()
    finally:
        stop.set()
        thread.join(5)
    try:
        assert len(killed) == 2, killed
        _FAULT_SEEN_PIDS.update(killed)
        assert not set(killed) & _fault_pids_in(init), "(test timing) a worker was killed after its init"
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(6)], progress=False) == \
                [i * 10 + 1 for i in range(6)]
        live = _fault_wait_pool(tm, init, 2, exclude=killed)
        assert not live & set(killed)
    finally:
        with _fault_deadline(30, "stop()"):
            tm.stop()
    _fault_wait_dead(set(killed) | _fault_pids_in(init), 10, "workers after stop()")


# ---------------------------------------------------------------------------------------------
# 2. Per-task timeouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_timeout_manager_default(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init, timeout=1.0) as tm:
        tasks = [Task(_fault_work, i, 0.05) for i in range(6)]
        tasks.insert(2, Task(_fault_sleep, 20, "slow"))
        with _fault_deadline(60, "execute"):
            res = tm.execute(tasks, progress=False)
        assert _fault_check_error_str(res[2]).startswith("TimeoutError"), res[2]
        assert res[:2] + res[3:] == [i * 10 + 1 for i in range(6)]
        # the worker running the overdue task was killed and replaced, with worker_init
        _fault_wait_pool(tm, init, 2, exact_inits=3)

        # submit() uses the default too; a per-call override wins
        slow = tm.submit(Task(_fault_sleep, 20, "slow"))
        fast = tm.submit(Task(_fault_sleep, 1.5, "allowed"), timeout=10)
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got[task.id] = result
        assert tm.open_tasks == 0
        assert got[fast] == "allowed"
        assert _fault_check_error_str(got[slow]).startswith("TimeoutError"), got[slow]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_timeout_per_call_override(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init) as tm:  # no default timeout
        tasks = [Task(_fault_work, 0), Task(_fault_sleep, 20, "slow"), Task(_fault_work, 1)]
        with _fault_deadline(60, "execute"):
            res = tm.execute(tasks, progress=False, timeout=0.8)
        assert res[0] == 1 and res[2] == 11
        assert _fault_check_error_str(res[1]).startswith("TimeoutError"), res[1]
        # the override was for that call only
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_sleep, 1.2, "ok")], progress=False) == ["ok"]
        slow = tm.submit(Task(_fault_sleep, 20, "slow"), timeout=0.8)
        fast = tm.submit(Task(_fault_work, 3))
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got[task.id] = result
        assert got[fast] == 31
        assert _fault_check_error_str(got[slow]).startswith("TimeoutError"), got[slow]
        _fault_wait_pool(tm, init, 2, exact_inits=4)

    with _fault_pool(fault_method, tmp_path / "init2.txt", error_mode="exception") as tm:
        with _fault_deadline(60, "execute"):
            with pytest.raises(TimeoutError):
                tm.execute([Task(_fault_work, 0), Task(_fault_sleep, 20, "slow")], progress=False, timeout=0.8)
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(3)], progress=False) == [1, 11, 21]
        tm.submit(Task(_fault_sleep, 20, "slow"), timeout=0.5)
        with _fault_deadline(60, "take"):
            with pytest.raises(TimeoutError):
                tm.take(timeout=None)
        assert tm.open_tasks == 0


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_timeout_counts_from_task_start(fault_method, tmp_path):
    # one worker, six 0.4 s tasks: the last starts ~2 s after submission, yet none is over 1 s
    with _fault_pool(fault_method, tmp_path / "init.txt", cpu_count=1, timeout=1.0) as tm:
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(_fault_sleep, 0.4, i) for i in range(6)], progress=False)
        assert res == list(range(6))


# ---------------------------------------------------------------------------------------------
# 3. max_tasks_per_child
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_max_tasks_per_child(fault_method, tmp_path):
    init, log = tmp_path / "init.txt", tmp_path / "log.txt"
    n, per_child = 20, 3
    with _fault_pool(fault_method, init, max_tasks_per_child=per_child) as tm:
        with _fault_deadline(90, "execute"):
            res = tm.execute([Task(_fault_work_pid, i, str(log)) for i in range(n)], progress=False)
        assert [r[0] for r in res] == [i * 10 + 1 for i in range(n)]
        runs = Counter(int(line.split()[0]) for line in _fault_lines(log))
        assert runs == Counter(range(n)), "tasks lost or run twice: %s" % runs
        per_pid = Counter(r[1] for r in res)
        assert max(per_pid.values()) <= per_child, per_pid
        assert len(per_pid) >= -(-n // per_child), per_pid
        assert set(per_pid) <= _fault_pids_in(init), "a worker ran tasks without worker_init"

        # submitted tasks too
        log2 = tmp_path / "log2.txt"
        ids = {tm.submit(Task(_fault_work_pid, i, str(log2))): i for i in range(10)}
        got = {}
        with _fault_deadline(90, "as_completed"):
            for task, result in tm.as_completed(timeout=80):
                got[task.id] = result
        assert tm.open_tasks == 0
        assert {tid: r[0] for tid, r in got.items()} == {tid: i * 10 + 1 for tid, i in ids.items()}
        assert Counter(int(x.split()[0]) for x in _fault_lines(log2)) == Counter(range(10))
        per_pid = Counter(r[1] for r in list(res) + list(got.values()))
        assert max(per_pid.values()) <= per_child, per_pid
        assert set(per_pid) <= _fault_pids_in(init)
        _fault_wait_pool(tm, init, 2, min_inits=len(per_pid))


# ---------------------------------------------------------------------------------------------
# 4. Unpicklable functions, arguments, return values and exceptions
# ---------------------------------------------------------------------------------------------

def _fault_bad_tasks(fh):
    lock = threading.Lock()

    def _fault_local_function():  # a closure over a lock: it can't travel, even by value
        return lock.locked()
    return [
        (Task(lambda: lock), "<lambda>"),
        (Task(_fault_local_function), "_fault_local_function"),
        (Task(_fault_identity, fh), "_fault_identity"),
        (Task(_fault_identity, lock), "_fault_identity"),
        (Task(_fault_identity, 1, key=lock), "_fault_identity"),
        (TaskChain(Task(_fault_identity, lock)), "_fault_identity"),
    ]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_unpicklable_tasks_are_refused(fault_method, tmp_path):
    with open(str(tmp_path / "file.txt"), "w") as fh, _fault_pool(fault_method, tmp_path / "init.txt") as tm:
        queued = {tm.submit(Task(_fault_work, i, 0.05)): i for i in range(4)}
        for task, name in _fault_bad_tasks(fh):
            with pytest.raises(TypeError) as excinfo:
                tm.submit(task)
            assert isinstance(excinfo.value, pickle.PicklingError), type(excinfo.value).__mro__
            assert name in str(excinfo.value), "the error does not name the task: %s" % excinfo.value
        assert tm.open_tasks == 4
        for task, name in _fault_bad_tasks(fh):
            with _fault_deadline(30, "execute"):
                with pytest.raises(TypeError) as excinfo:
                    tm.execute([Task(_fault_work, 1), task], progress=False)
            assert isinstance(excinfo.value, pickle.PicklingError)
            assert name in str(excinfo.value), str(excinfo.value)
        # a chain's next_task runs in the parent: it need not be picklable
        with _fault_deadline(30, "execute"):
            assert tm.execute([TaskChain(Task(_fault_work, 2), lambda prev, result: None)],
                              progress=False) == [21]
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got[task.id] = result
        assert got == {tid: i * 10 + 1 for tid, i in queued.items()}, "queued work was lost"
        assert tm.open_tasks == 0
        with _fault_deadline(30, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(3)], progress=False) == [1, 11, 21]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_unpicklable_results_and_exceptions_str_mode(fault_method, tmp_path):
    with _fault_pool(fault_method, tmp_path / "init.txt") as tm:
        tasks = [Task(_fault_work, 0), Task(_fault_return_lambda), Task(_fault_work, 1),
                 Task(_fault_return_lock), Task(_fault_work, 2),
                 Task(_fault_raise_locked, "locked-boom-17"), Task(_fault_work, 3),
                 Task(_fault_raise_two_arg, "x", "y"), Task(_fault_work, 4)]
        with _fault_deadline(60, "execute"):
            res = tm.execute(tasks, progress=False)
        assert [res[i] for i in (0, 2, 4, 6, 8)] == [1, 11, 21, 31, 41]
        for i in (1, 3):
            _fault_check_error_str(res[i])
            assert "pickle" in res[i].lower(), res[i]
        _fault_check_error_str(res[5], "_FaultLockedError", "locked-boom-17")
        _fault_check_error_str(res[7], "_FaultTwoArgError", "two-arg-failure x y")
        # the same through submit/take
        for task in tasks[1::2]:
            tm.submit(task)
        out = []
        with _fault_deadline(60, "take"):
            while tm.open_tasks:
                out.append(tm.take(timeout=None))
        assert len(out) == 4 and all(isinstance(x, str) and x.startswith("Traceback") for x in out), out
        with _fault_deadline(30, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(3)], progress=False) == [1, 11, 21]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_unpicklable_results_and_exceptions_exception_mode(fault_method, tmp_path):
    with _fault_pool(fault_method, tmp_path / "init.txt", error_mode="exception") as tm:
        for func in (_fault_return_lambda, _fault_return_lock):
            with _fault_deadline(60, "execute"):
                with pytest.raises(Exception) as excinfo:
                    tm.execute([Task(_fault_work, 0), Task(func), Task(_fault_work, 1)], progress=False)
            assert "pickle" in str(excinfo.value).lower(), repr(excinfo.value)
            with _fault_deadline(30, "execute"):
                assert tm.execute([Task(_fault_work, i) for i in range(3)], progress=False) == [1, 11, 21]
        cases = [(Task(_fault_raise_locked, "locked-boom-17"), "_FaultLockedError", "locked-boom-17"),
                 (Task(_fault_raise_two_arg, "x", "y"), "_FaultTwoArgError", "two-arg-failure x y")]
        for task, type_name, text in cases:
            with _fault_deadline(60, "execute"):
                with pytest.raises(Exception) as excinfo:
                    tm.execute([Task(_fault_work, 0), task], progress=False)
            assert text in str(excinfo.value), str(excinfo.value)
            assert type_name in str(excinfo.value), str(excinfo.value)
            assert isinstance(excinfo.value, RuntimeError), \
                "spec: an exception that can't be pickled/rebuilt arrives as RuntimeError, got %r" % excinfo.value
            with _fault_deadline(30, "execute"):
                assert tm.execute([Task(_fault_work, i) for i in range(3)], progress=False) == [1, 11, 21]
            tm.submit(task)
            with _fault_deadline(60, "take"):
                with pytest.raises(RuntimeError, match=re.escape(text)):
                    tm.take(timeout=None)
            assert tm.open_tasks == 0


# ---------------------------------------------------------------------------------------------
# 5. A failing worker_init
# ---------------------------------------------------------------------------------------------

def _fault_check_failed_start(tm, init, fault_method):
    # no processes left behind
    _fault_wait_dead(_fault_pids_in(init), 5, "workers of a pool whose worker_init failed")
    assert not [p for p in multiprocessing.active_children() if p.pid in _fault_pids_in(init)]
    leftovers = {p: s for p, s in _fault_descendants().items() if s not in ("Z", "X")}
    active = {p.pid for p in multiprocessing.active_children()}
    assert set(leftovers) <= active, "processes left behind: %s" % leftovers  # (others' pools only)
    # no endless respawn
    n_inits = len(_fault_lines(init))
    assert 1 <= n_inits <= 10, n_inits
    time.sleep(1.0)
    assert len(_fault_lines(init)) == n_inits, "workers are still being started after start() failed"
    # the manager is not running
    with _fault_deadline(30, "execute on a manager whose start failed"):
        with pytest.raises(RuntimeError):
            tm.execute([Task(_fault_work, 1)], progress=False)
    with _fault_deadline(30, "stop"):
        tm.stop()


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_worker_init_raises(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    tm = TaskManager(cpu_count=2, context=fault_method,
                     worker_init=Task(_fault_init_raise, str(init), "init-boom-7431"))
    with _fault_deadline(60, "start() with a failing worker_init"):
        with pytest.raises(RuntimeError) as excinfo:
            tm.start()
    message = str(excinfo.value)
    assert "init-boom-7431" in message, message
    assert "ValueError" in message, message
    assert "_fault_init_raise" in message, "the init's traceback is not in the message:\n" + message
    _fault_check_failed_start(tm, init, fault_method)
    # trying again fails the same way, without hanging
    with _fault_deadline(60, "second start()"):
        with pytest.raises(RuntimeError, match="init-boom-7431"):
            tm.start()
    _fault_wait_dead(_fault_pids_in(init), 5, "workers of a pool whose worker_init failed twice")


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_worker_init_exits(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    tm = TaskManager(cpu_count=2, context=fault_method, worker_init=Task(_fault_init_exit, str(init)))
    with _fault_deadline(60, "start() with a worker_init that calls os._exit(1)"):
        with pytest.raises(RuntimeError):
            tm.start()
    _fault_check_failed_start(tm, init, fault_method)


# ---------------------------------------------------------------------------------------------
# 6./7./8. Ctrl-C, a SIGKILLed parent, a manager left open at exit (child scripts)
# ---------------------------------------------------------------------------------------------

# The child scripts of the Ctrl-C and exit tests begin with this: a task that runs a while,
# and how they list their workers for the test to find.
_SCRIPT_PRELUDE = r'''import multiprocessing, os, signal, sys, time, traceback
if __name__ == "__main__":  # as a program run from a terminal, even when the tests run in the
    # background (a shell starts background jobs with SIGINT ignored); not in workers, which
    # run this file as __mp_main__ and must stay deaf to Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, @@REPO@@)
import mplite


def fault_long(marker_dir, seconds):
    open(os.path.join(marker_dir, "%d.started" % os.getpid()), "w").close()
    time.sleep(seconds)
    return seconds


def write_pids(marker_dir):
    pids = sorted(p.pid for p in multiprocessing.active_children())
    tmp = os.path.join(marker_dir, "pids.tmp")
    with open(tmp, "w") as fh:
        fh.write(" ".join(map(str, pids)))
    os.replace(tmp, os.path.join(marker_dir, "pids.txt"))


def interrupted(submit):
    """After the KeyboardInterrupt: show it, check nothing more is accepted, exit as a shell would."""
    traceback.print_exc()
    sys.stderr.flush()
    try:
        submit()
    except RuntimeError:
        print("STOPPED-OK", flush=True)
    else:
        print("NOT-STOPPED", flush=True)
    sys.exit(130)
'''

_FAULT_SCRIPT = r'''
@@PRELUDE@@


def fault_quick(x):
    return x + 1


def fault_init_sleep(marker_dir):
    open(os.path.join(marker_dir, "%d.started" % os.getpid()), "w").close()
    time.sleep(30)




def main():
    scenario, method, marker_dir = sys.argv[1:4]
    if scenario == "ctrlc-start":  # Ctrl-C while start() waits for the workers' worker_init
        tm = mplite.TaskManager(cpu_count=2, context=method,
                                worker_init=mplite.Task(fault_init_sleep, marker_dir))
        try:
            tm.start()
        except KeyboardInterrupt:
            interrupted(lambda: tm.submit(mplite.Task(fault_quick, 1)))
        print("NO-KEYBOARDINTERRUPT", flush=True)
        sys.exit(3)
    tm = mplite.TaskManager(cpu_count=3, context=method)  # 2 busy workers, 1 idle
    tm.start()
    write_pids(marker_dir)
    if scenario.startswith("ctrlc"):
        try:
            if scenario == "ctrlc-execute":
                tm.execute([mplite.Task(fault_long, marker_dir, 60) for _ in range(2)], progress=False)
            else:
                for _ in range(2):
                    tm.submit(mplite.Task(fault_long, marker_dir, 60))
                tm.take(timeout=None)
        except KeyboardInterrupt:
            interrupted(lambda: tm.submit(mplite.Task(fault_quick, 1)))
        print("NO-KEYBOARDINTERRUPT", flush=True)
        sys.exit(3)
    elif scenario == "parent-kill":
        for _ in range(2):
            tm.submit(mplite.Task(fault_long, marker_dir, 60))
        print("READY", flush=True)
        time.sleep(120)
    elif scenario == "exit-open":
        assert tm.execute([mplite.Task(fault_quick, i) for i in range(10)], progress=False) == list(range(1, 11))
        tm.submit(mplite.Task(fault_long, marker_dir, 60))
        deadline = time.time() + 30
        while not any(n.endswith(".started") for n in os.listdir(marker_dir)) and time.time() < deadline:
            time.sleep(0.02)
        print("LEAVING", flush=True)
        # falls off the end with the manager still running


if __name__ == "__main__":
    main()
'''


def session_processes(proc):
    """{pid: cmdline} of the live processes of the session that the child proc (started with
    start_new_session=True) leads: its process group. Windows has neither sessions nor process
    groups (start_new_session is ignored there): there, the live descendants of proc."""
    if WINDOWS:
        return {pid: cmd for pid, state, cmd in descendant_processes(proc.pid) if state not in ("Z", "X", "x")}
    return {pid: _cmdline(pid) for pid, (_, state, group) in _fault_proc_table(with_pgrp=True).items()
            if group == proc.pid and state not in ("Z", "X", "x")}


def kill_session(proc):
    """Whatever happened, leave nothing of proc's session running (see session_processes)."""
    if WINDOWS:
        for pid in session_processes(proc):
            with contextlib.suppress(OSError):
                kill_hard(pid)
        with contextlib.suppress(OSError):
            proc.kill()
    else:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(10)


def assert_session_ends(proc, what):
    """proc has exited: the rest of its session (workers, multiprocessing's resource tracker and
    forkserver, which exit once their pipe from it closes) must be gone within 15 s."""
    deadline = time.monotonic() + 15
    while session_processes(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = session_processes(proc)
    assert not left, "processes of %s left behind: %s" % (what, left)


class _FaultScript:
    """A child script (the one above unless told), in its own session (so its process group is what a
    terminal sees)."""

    def __init__(self, tmp_path, scenario, method, script=_FAULT_SCRIPT):
        self.dir = tmp_path / "markers"
        self.dir.mkdir()
        source, script = script, tmp_path / "fault_child.py"
        script.write_text(source.replace("@@PRELUDE@@", _SCRIPT_PRELUDE).replace("@@REPO@@", repr(_FAULT_REPO)))
        self.out_path, self.err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(str(self.out_path), "w") as out, open(str(self.err_path), "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), scenario, method, str(self.dir)],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=str(tmp_path), start_new_session=True)
        self.pids = set()

    def worker_pids(self, n_started, pid_file=True):
        if pid_file:
            _fault_wait_files(self.dir, "pids.txt", 1)
        _fault_wait_files(self.dir, ".started", n_started)
        if pid_file:
            self.pids = {int(x) for x in (self.dir / "pids.txt").read_text().split()}
        self.pids |= {int(x.split(".")[0]) for x in os.listdir(str(self.dir)) if x.endswith(".started")}
        _FAULT_SEEN_PIDS.update(self.pids)
        return self.pids

    def wait(self, limit=30):
        try:
            self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            pytest.fail("the child script did not exit within %s s (hang)\nstdout:\n%s\nstderr:\n%s"
                        % (limit, self.stdout, self.stderr))
        return self.proc.returncode

    def assert_group_gone(self, limit=5):
        """Bounded poll until no process of the script's process group runs (multiprocessing's own
        resource tracker / forkserver aside: they go when their pipe from the script closes)."""
        deadline = time.monotonic() + limit
        while True:
            left = {pid: cmd for pid, cmd in session_processes(self.proc).items()
                    if not any(m in cmd for m in _FAULT_SINGLETONS)}
            if not left:
                return
            assert time.monotonic() < deadline, "processes of the script left behind: %s" % left
            time.sleep(0.05)

    @property
    def stdout(self):
        return self.out_path.read_text()

    @property
    def stderr(self):
        return self.err_path.read_text()

    def cleanup(self):
        """Whatever the outcome, leave nothing running."""
        for pid in self.pids:
            if _fault_alive(pid):
                with contextlib.suppress(OSError):
                    kill_hard(pid)
        kill_session(self.proc)


def _ctrl_c_and_check(child, pids):
    """A terminal's Ctrl-C to the child's process group: it must exit promptly with 130, its pool
    stopped, one KeyboardInterrupt traceback (its own, none from a worker), nothing left behind.
    (A pool that waited for the running tasks would take a minute.)"""
    os.killpg(child.proc.pid, signal.SIGINT)
    rc = child.wait(30)
    out, err = child.stdout, child.stderr
    report = "rc=%s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err)
    assert rc == 130, report
    assert "STOPPED-OK" in out, "the pool was not left stopped\n" + report
    ki_lines = [line for line in err.splitlines() if line.startswith("KeyboardInterrupt")]
    assert len(ki_lines) == 1, "expected exactly one KeyboardInterrupt traceback\n" + report
    assert err.count("Traceback (most recent call last)") == 1, report
    assert not re.search(r"^Process \S+:$", err, re.M), "a worker printed a traceback\n" + report
    _fault_wait_dead(pids, 5, "workers after Ctrl-C")
    child.assert_group_gone()


_CTRL_C_ON_ANOTHER_THREAD = r"""
import signal, sys, threading, time
import mplite

def nap(seconds):
    time.sleep(seconds)
    return seconds

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal: see _SCRIPT_PRELUDE
    with mplite.TaskManager(2) as tm:
        other = threading.Thread(target=time.sleep, args=(120,), daemon=True)
        other.start()
        threading.Timer(1.0, signal.pthread_kill, (other.ident, signal.SIGINT)).start()
        try:
            tm.%s
        except KeyboardInterrupt:
            print("INTERRUPTED")
"""


@posix_only("a SIGINT sent to another thread (signal.pthread_kill)")
@pytest.mark.parametrize("call", ["execute([mplite.Task(nap, 100)] * 2, progress=False)",
                                  "submit(mplite.Task(nap, 100)) and tm.take(timeout=None)",
                                  "map(nap, [100, 100])", "imap(nap, [100, 100]).__next__()"])
def test_ctrl_c_taken_by_another_thread_still_interrupts_the_wait(call, tmp_path):
    # The kernel gives a process's SIGINT to any thread that doesn't block it: a caller waiting
    # for results must see it even when another thread took it (mplite's engine blocks it).
    script = tmp_path / "ctrl_c_elsewhere.py"
    script.write_text(_CTRL_C_ON_ANOTHER_THREAD % call)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=str(tmp_path), timeout=60,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0 and "INTERRUPTED" in out, out


@posix_only("a terminal's Ctrl-C: SIGINT sent to a process group (os.killpg)")
@pytest.mark.parametrize("scenario,fault_method", where_available([
    ("ctrlc-execute", "spawn"), ("ctrlc-execute", "fork"), ("ctrlc-execute", "forkserver"),
    ("ctrlc-take", "spawn"), ("ctrlc-take", "fork"), ("ctrlc-start", "spawn"), ("ctrlc-start", "fork")]))
def test_fault_ctrl_c(scenario, fault_method, tmp_path):
    child = _FaultScript(tmp_path, scenario, fault_method)
    try:
        if scenario == "ctrlc-start":  # both workers are in worker_init, start() waits for them
            pids = child.worker_pids(2, pid_file=False)
            assert len(pids) == 2, pids
        else:  # two workers are running a task, the third is idle
            pids = child.worker_pids(2)
            assert len(pids) == 3, pids
        _ctrl_c_and_check(child, pids)
    finally:
        child.cleanup()


@pytest.mark.parametrize("fault_method,signame", [  # Windows: SIGTERM only (os.kill: TerminateProcess)
    p for p in where_available([("spawn", "SIGKILL"), ("fork", "SIGKILL"), ("forkserver", "SIGKILL"),
                                ("spawn", "SIGTERM")]) if hasattr(signal, p[1])])
def test_fault_parent_killed(fault_method, signame, tmp_path):
    child = _FaultScript(tmp_path, "parent-kill", fault_method)
    try:
        pids = child.worker_pids(2)  # 2 busy workers, 1 idle
        assert len(pids) == 3, pids
        os.kill(child.proc.pid, getattr(signal, signame))  # SIGTERM: Python's default, no cleanup runs
        child.wait(10)
        _fault_wait_dead(pids, 5, "workers of a parent killed by " + signame)
        child.assert_group_gone()
    finally:
        child.cleanup()


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_manager_left_open_at_interpreter_exit(fault_method, tmp_path):
    child = _FaultScript(tmp_path, "exit-open", fault_method)
    try:
        pids = child.worker_pids(1)  # one worker busy with a 60 s task, two idle
        rc = child.wait(30)
        report = "rc=%s\nstdout:\n%s\nstderr:\n%s" % (rc, child.stdout, child.stderr)
        assert rc == 0 and "LEAVING" in child.stdout, report
        assert "Traceback" not in child.stderr, report
        _fault_wait_dead(pids, 5, "workers of a manager left open at exit")
        child.assert_group_gone()
    finally:
        child.cleanup()


# ---------------------------------------------------------------------------------------------
# 8. stop() with work in flight, take() while workers die, garbage collection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_stop_with_running_and_queued_tasks(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    markers = tmp_path / "markers"
    markers.mkdir()
    tm = TaskManager(cpu_count=2, context=fault_method, worker_init=Task(_fault_init_record, str(init)))
    with _fault_deadline(60, "start()"):
        tm.start()
    try:
        for _ in range(6):  # 2 running, 4 queued
            tm.submit(Task(_fault_marker_sleep, str(markers), 30))
        _fault_wait_files(markers, ".started", 2)
        pids = _fault_pids_in(init)
        with _fault_deadline(30, "stop() with tasks running"):
            tm.stop()
        _fault_wait_dead(pids, 10, "running workers after stop()")
        calls = {
            "execute": lambda: tm.execute([Task(_fault_work, 1)], progress=False),
            "submit": lambda: tm.submit(Task(_fault_work, 1)),
            "map": lambda: tm.map(_fault_work, [1]),
            "take": lambda: tm.take(),
            "take(None)": lambda: tm.take(timeout=None),
            "as_completed": lambda: list(tm.as_completed()),
        }
        for name, call in calls.items():
            with _fault_deadline(10, name + " on a stopped manager"):
                with pytest.raises(RuntimeError):
                    call()
        with _fault_deadline(30, "second stop()"):
            tm.stop()  # idempotent
        with _fault_deadline(60, "start() after stop()"):
            tm.start()
        assert tm.open_tasks == 0, "the restarted pool still counts discarded tasks"
        with _fault_deadline(60, "execute after restart"):
            assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]
        assert tm.take() is None
        assert len(_fault_live_workers(init)) == 2
    finally:
        with _fault_deadline(30, "stop()"):
            tm.stop()
    _fault_wait_dead(_fault_pids_in(init), 10, "workers after the final stop()")


@pytest.mark.parametrize("fault_method,mode", where_available([("spawn", "str"), ("fork", "exception")]))
def test_fault_take_while_a_worker_dies(fault_method, mode, tmp_path):
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init, error_mode=mode) as tm:
        tm.submit(Task(_fault_die, _HARD_KILL))
        with _fault_deadline(60, "take(timeout=None) while the worker dies"):
            if mode == "str":
                _fault_check_death_str(tm.take(timeout=None), _HARD_KILL)
            else:
                with pytest.raises(ChildProcessError, match=KILLED):
                    tm.take(timeout=None)
        assert tm.open_tasks == 0
        with _fault_deadline(10, "take(timeout=None) with nothing open"):
            assert tm.take(timeout=None) is None
        # take(timeout>0) too, with a good task next to the dying one
        tm.submit(Task(_fault_die, _HARD_KILL))
        tm.submit(Task(_fault_work, 5, 0.1))
        results, errors = [], []
        with _fault_deadline(60, "take(timeout=30)"):
            while tm.open_tasks:
                try:
                    r = tm.take(timeout=30)
                except ChildProcessError as exc:
                    errors.append(str(exc))
                    continue
                assert r is not None, "take(timeout=30) gave up while a task was open"
                results.append(r)
        if mode == "str":
            assert 51 in results and len(results) == 2
            _fault_check_death_str([r for r in results if r != 51][0], _HARD_KILL)
        else:
            assert results == [51] and len(errors) == 1 and "SIGKILL" in errors[0]
        _fault_wait_pool(tm, init, 2, exact_inits=4)


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_garbage_collected_manager_cleans_up(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    tm = TaskManager(cpu_count=2, context=fault_method, worker_init=Task(_fault_init_record, str(init)))
    with _fault_deadline(60, "start()"):
        tm.start()
    with _fault_deadline(60, "execute"):
        assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]
    pids = _fault_wait_pool(tm, init, 2, exact_inits=2)
    ref = weakref.ref(tm)
    del tm
    gc.collect()
    try:
        _fault_wait_dead(pids, 10, "workers of a garbage-collected manager (manager collected: %s)"
                         % (ref() is None))
    finally:
        if ref() is not None:  # leave nothing behind for the next tests
            with _fault_deadline(30, "stop()"):
                ref().stop()


# ---------------------------------------------------------------------------------------------
# 9. Bad input
# ---------------------------------------------------------------------------------------------

def _fault_check_clean_error(excinfo):
    message = str(excinfo.value)
    assert message.strip(), "an error without a message: %r" % excinfo.value
    for entry in excinfo.traceback:
        path = str(entry.path)
        assert not (os.sep + "multiprocessing" + os.sep in path
                    or path.endswith(("queue.py", "threading.py", "selectors.py", "pickle.py"))), \
            "error raised deep inside %s: %r" % (path, excinfo.value)


_FAULT_BAD_CONSTRUCTORS = [
    (dict(cpu_count=0), ValueError),
    (dict(cpu_count=-1), ValueError),
    (dict(cpu_count="2"), TypeError),
    (dict(cpu_count=2.0), TypeError),
    (dict(cpu_count=True), TypeError),
    (dict(context="nope"), ValueError),
    (dict(context=5), TypeError),
    (dict(worker_init=_fault_work), TypeError),
    (dict(worker_init=5), TypeError),
    (dict(error_mode="x"), ValueError),
    (dict(timeout=-1), ValueError),
    (dict(timeout=0), ValueError),
    (dict(timeout="1"), (TypeError, ValueError)),
    (dict(max_tasks_per_child=0), ValueError),
    (dict(max_tasks_per_child=-3), ValueError),
    (dict(max_tasks_per_child=1.5), (TypeError, ValueError)),
]


@pytest.mark.parametrize("kwargs,error", _FAULT_BAD_CONSTRUCTORS, ids=[repr(k) for k, _ in _FAULT_BAD_CONSTRUCTORS])
def test_fault_bad_constructor_arguments(kwargs, error):
    with pytest.raises(error) as excinfo:
        TaskManager(**kwargs)
    _fault_check_clean_error(excinfo)


def test_fault_bad_calls(tmp_path):
    log = tmp_path / "log.txt"
    with _fault_pool(FAST_METHOD, tmp_path / "init.txt") as tm:
        bad_calls = [
            ("execute(5)", lambda: tm.execute(5), TypeError),
            ("execute(None)", lambda: tm.execute(None), TypeError),
            ("execute([1, 2])", lambda: tm.execute([1, 2]), TypeError),
            ("execute('abc')", lambda: tm.execute("abc"), TypeError),
            ("execute([Task, 3])", lambda: tm.execute(iter([Task(_fault_work, 7, 0, str(log)), 3])), TypeError),
            ("execute(timeout=-1)", lambda: tm.execute([Task(_fault_work, 7, 0, str(log))], timeout=-1), ValueError),
            ("execute(timeout=0)", lambda: tm.execute([Task(_fault_work, 7, 0, str(log))], timeout=0), ValueError),
            ("submit(None)", lambda: tm.submit(None), TypeError),
            ("submit(5)", lambda: tm.submit(5), TypeError),
            ("submit(function)", lambda: tm.submit(_fault_work), TypeError),
            ("submit([Task])", lambda: tm.submit([Task(_fault_work, 7, 0, str(log))]), TypeError),
            ("submit(timeout=-1)", lambda: tm.submit(Task(_fault_work, 7, 0, str(log)), timeout=-1), ValueError),
            ("map(5, [1])", lambda: tm.map(5, [1]), TypeError),
            ("map(f, 5)", lambda: tm.map(_fault_work, 5), TypeError),
            ("take(timeout=-1)", lambda: tm.take(timeout=-1), ValueError),
            ("Task(5)", lambda: Task(5), TypeError),
        ]
        for name, call, error in bad_calls:
            with _fault_deadline(10, name):
                with pytest.raises(error) as excinfo:
                    call()
            _fault_check_clean_error(excinfo)
        assert tm.open_tasks == 0
        with _fault_deadline(30, "execute"):
            assert tm.execute([Task(_fault_work, i) for i in range(4)], progress=False) == [1, 11, 21, 31]
        assert _fault_lines(log) == [], "a refused call still ran a task"


# ---------------------------------------------------------------------------------------------
# 10. Soak: 10,000 tiny tasks while workers are SIGKILLed at random
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_soak_random_worker_kills(fault_method, tmp_path):
    init, log = tmp_path / "init.txt", tmp_path / "log.txt"
    n = 10000
    kills = []
    stop = threading.Event()

    def killer():
        rng = random.Random(20240)
        deadline = time.monotonic() + 6  # then let the pool finish in peace
        while not stop.is_set() and time.monotonic() < deadline:
            live = sorted(_fault_live_workers(init))
            if live:
                pid = rng.choice(live)
                with contextlib.suppress(PROCESS_GONE):
                    kill_hard(pid)
                    kills.append(pid)
            stop.wait(0.05)

    with _fault_pool(fault_method, init) as tm:
        ids = {tm.submit(Task(_fault_soak_task, i, str(log))): i for i in range(n)}
        assert tm.open_tasks == n
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        got = {}
        try:
            with _fault_deadline(100, "as_completed under random worker kills"):
                for task, result in tm.as_completed(timeout=90):
                    assert task.id not in got, "task %s yielded twice" % task.id
                    got[task.id] = result
        finally:
            stop.set()
            thread.join(5)
        assert tm.open_tasks == 0
        assert set(got) == set(ids), "missing: %d, unknown: %d" % (len(set(ids) - set(got)), len(set(got) - set(ids)))
        errors = []
        got_by_index = {i: got[tid] for tid, i in ids.items()}
        for tid, i in ids.items():
            result = got[tid]
            if result != i * 7 + 3:
                assert isinstance(result, str) and KILLED in result and "_fault_soak_task" in result, \
                    "task %d: %r" % (i, result)
                errors.append(i)
        runs = Counter(int(x) for x in _fault_lines(log))
        twice = sorted(k for k, v in runs.items() if v > 1)
        assert not twice, "tasks that ran more than once: %s" % twice[:20]
        not_run = sorted(i for i in range(n) if got_by_index[i] == i * 7 + 3 and runs[i] != 1)
        assert not not_run, "tasks with a result that never ran: %s" % not_run[:20]
        assert kills, "the killer never found a worker"
        assert len(errors) <= len(kills), "%d task errors but only %d kills" % (len(errors), len(kills))
        _fault_wait_pool(tm, init, 2, exclude=kills)
        with _fault_deadline(60, "execute after the soak"):
            assert tm.execute([Task(_fault_square, i) for i in range(100)], progress=False) == \
                [i * i for i in range(100)]


# ---------------------------------------------------------------------------------------------
# 11. Many tiny tasks (batched by the engine)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_tiny_tasks_order_errors_and_deaths(fault_method, tmp_path):
    init = tmp_path / "init.txt"
    with _fault_pool(fault_method, init) as tm:
        # order is preserved
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(_fault_square, i) for i in range(3000)], progress=False) == \
                [i * i for i in range(3000)]
        with _fault_deadline(60, "map"):
            assert tm.map(_fault_square, range(2000)) == [i * i for i in range(2000)]
        # an error inside a run of tiny tasks affects only its task
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(_fault_tiny, i, 500) for i in range(1000)], progress=False)
        assert _fault_check_error_str(res[500]) == "ValueError: bad-500", res[500]
        assert res[:500] + res[501:] == [i * 3 for i in range(1000) if i != 500]

        # a worker killed inside a run of tiny tasks costs only the task it was running
        n, die_at = 600, 300
        log = tmp_path / "log.txt"
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(_fault_tiny_logged, i, str(log), die_at) for i in range(n)], progress=False)
        _fault_check_error_str(res[die_at], KILLED, "_fault_tiny_logged")
        assert res[:die_at] + res[die_at + 1:] == [i * 3 for i in range(n) if i != die_at]
        runs = Counter(int(x) for x in _fault_lines(log))
        assert runs == Counter(i for i in range(n) if i != die_at), \
            "run twice: %s; lost: %s" % (sorted(k for k, v in runs.items() if v > 1),
                                         sorted(set(range(n)) - set(runs) - {die_at}))

        # the same through submit / as_completed
        log2 = tmp_path / "log2.txt"
        ids = {tm.submit(Task(_fault_tiny_logged, i, str(log2), die_at)): i for i in range(n)}
        got = {}
        with _fault_deadline(60, "as_completed"):
            for task, result in tm.as_completed(timeout=50):
                got[task.id] = result
        assert tm.open_tasks == 0
        for tid, i in ids.items():
            if i == die_at:
                _fault_check_error_str(got[tid], KILLED)
            else:
                assert got[tid] == i * 3
        assert Counter(int(x) for x in _fault_lines(log2)) == Counter(i for i in range(n) if i != die_at)
        _fault_wait_pool(tm, init, 2, exact_inits=4)


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_tiny_tasks_exception_mode(fault_method, tmp_path):
    with _fault_pool(fault_method, tmp_path / "init.txt", error_mode="exception") as tm:
        with _fault_deadline(60, "execute"):
            with pytest.raises(ValueError, match="^bad-500$"):
                tm.execute([Task(_fault_tiny, i, 500) for i in range(1000)], progress=False)
        with _fault_deadline(60, "execute"):  # no stale results from the cancelled call
            assert tm.execute([Task(_fault_tiny, i) for i in range(1000)], progress=False) == \
                [i * 3 for i in range(1000)]


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_fault_tiny_tasks_timeout(fault_method, tmp_path):
    init, log = tmp_path / "init.txt", tmp_path / "log.txt"
    n, slow_at = 400, 200
    with _fault_pool(fault_method, init, timeout=1.0) as tm:
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(_fault_tiny_logged, i, str(log), -1, slow_at) for i in range(n)],
                             progress=False)
        assert _fault_check_error_str(res[slow_at]).startswith("TimeoutError"), res[slow_at]
        assert res[:slow_at] + res[slow_at + 1:] == [i * 3 for i in range(n) if i != slow_at]
        assert Counter(int(x) for x in _fault_lines(log)) == Counter(i for i in range(n) if i != slow_at)
        _fault_wait_pool(tm, init, 2, exact_inits=3)


# =============================================================================================
# Issue 7: the engine works in the background, every TaskManager method is safe from any thread,
# and mplite.ProcessPoolExecutor gives concurrent.futures / asyncio code the same engine.
#
# As everywhere in this file: no timed assertions. Progress is shown by gates (files that only a
# finished task writes, futures that only a finished task completes), each bounded by a deadline
# so that no progress is a failure, not a hang. Threads are joined with a timeout, then checked.
# =============================================================================================

ENGINE_THREAD_NAME = "mplite-engine"


# ---------------------------------------------------------------------------------------------
# Task functions (module level, picklable)
# ---------------------------------------------------------------------------------------------

def _bg_write_atomically(path, text):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _bg_touch_after(path, seconds, value):
    """Sleep, then create `path` (atomically): the file exists only once the task has finished."""
    time.sleep(seconds)
    _bg_write_atomically(path, str(os.getpid()))
    return value


def _bg_gated(marker, gate, value, limit=60):
    """Create `marker` (the task runs now), then wait for the file `gate` (bounded), return value."""
    _bg_write_atomically(marker, str(os.getpid()))
    return wait_for_file(gate, value, limit)


def _bg_pid_then_sleep(pid_file, seconds):
    _bg_write_atomically(pid_file, str(os.getpid()))
    time.sleep(seconds)
    return "slept %s" % seconds


_PARENT_MARK = None  # set by a test in the parent: forked workers see it, spawned ones don't


def _bg_worker_identity():
    with open("/proc/self/cmdline", "rb") as fh:
        cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
    return _PARENT_MARK, cmdline, os.getpid()


class StaleCheck:
    """An object whose collection shows that the executor let go of it (CPython's MyObject)."""

    def my_method(self):
        return None


def make_stale_check():
    return StaleCheck()


def ignore_args(*args, **kwargs):
    return None


class DelMarker:
    """Creates `path` when a copy of it is collected in another process (a worker)."""

    def __init__(self, path):
        self.path, self.parent = path, os.getpid()

    def __del__(self):
        if os.getpid() != self.parent:
            _bg_write_atomically(self.path, "collected")


class RaiseAtPickle:
    def __reduce__(self):
        raise ValueError("this object refuses to be pickled")


class ExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


class CrashAtPickle:
    def __reduce__(self):
        os._exit(3)


class CrashAtUnpickle:
    """Pickles fine; rebuilding it (in a worker) ends that process."""

    def __reduce__(self):
        return (_fault_die, ("exit3",))


def return_instance(cls):
    return cls()


class ExitWhenRebuilt:
    """Pickles fine; rebuilding it (in the parent, on mplite's engine thread) calls sys.exit(7)."""

    def __reduce__(self):
        return (sys.exit, (7,))


def chain_then_exit(prev_task, result):  # a TaskChain's next_task: runs on the engine thread
    sys.exit(5)


def test_system_exit_from_user_code_on_the_engine_thread_fails_only_that_task(pools):
    # next_task and the rebuilding of results run on the engine thread: a SystemExit there is
    # that task's error, never the end of the engine (nor a caller waiting for ever).
    tm = pools.get("spawn")
    try:
        tasks = [TaskChain(Task(adder, 1, 2), chain_then_exit), Task(return_instance, ExitWhenRebuilt),
                 Task(adder, 2, 2)]
        results = bounded(lambda: tm.execute(tasks, progress=False), 60)
        assert results[0].splitlines()[-1] == "SystemExit: 5", results[0]
        assert "can't be unpickled here" in results[1], results[1]
        assert results[2] == 4
        assert tm.execute([Task(adder, 1, 1)], progress=False) == [2]
    finally:
        pools.release(tm)


NESTED_MANAGER = []  # the manager a chain's next_task below calls into


def chain_then_execute(prev_task, result):  # runs on the engine thread: it may not wait there
    return NESTED_MANAGER[0].execute([Task(adder, result, 1)], progress=False)


def test_waiting_on_the_engine_thread_is_refused_not_a_deadlock(pools):
    tm = pools.get("spawn")
    NESTED_MANAGER.append(tm)
    try:
        results = bounded(lambda: tm.execute([TaskChain(Task(adder, 1, 2), chain_then_execute),
                                              Task(adder, 2, 2)], progress=False), 60)
        assert "RuntimeError: a TaskChain's next_task" in results[0].splitlines()[-1], results[0]
        assert results[1] == 4
        assert tm.execute([Task(adder, 1, 1)], progress=False) == [2]  # the engine went on
    finally:
        NESTED_MANAGER.clear()
        pools.release(tm)


def poll_active_children(stop):
    while not stop.is_set():
        multiprocessing.active_children()
        time.sleep(0.001)


def test_workers_reaped_by_multiprocessing_elsewhere_still_report_their_death(method):
    # Another thread's active_children() (or Process.start()) reaps the children multiprocessing
    # knows of, mplite's workers too: the pool must keep its health, and each task its error.
    stop = threading.Event()
    poller = threading.Thread(target=poll_active_children, args=(stop,))
    poller.start()
    try:
        with TaskManager(2, context=method) as tm:
            results = bounded(lambda: tm.execute([Task(_fault_die, _HARD_KILL) for _ in range(12)],
                                                 progress=False), 90)
            assert tm.execute([Task(adder, 1, 1)], progress=False) == [2]
    finally:
        stop.set()
        poller.join(10)
    # Each killed task gets its worker's death as its error. (Its cause may read "its exit status
    # was collected elsewhere" when that thread reaped the worker first: multiprocessing's.)
    assert all(r.splitlines()[-1].startswith("ChildProcessError: the worker process") for r in results), results


def test_executor_shutdown_never_raises():
    ex = mplite.ProcessPoolExecutor(1, initializer=raise_value_error, initargs=("init fails",))
    try:
        future = ex.submit(adder, 1, 2)
    except BrokenProcessPool:
        pass
    else:
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=60)
    for _ in range(2):  # a broken pool, then a closed one
        ex.shutdown(wait=False, cancel_futures=True)
    ex.shutdown(cancel_futures=True)


EXIT_WITH_MAIN_CLASSES = """
import sys, time
import mplite

class Point:
    def __init__(self, x):
        self.x = x

def work(p):
    time.sleep(0.01)
    return p.x

if __name__ == "__main__":
    ex = mplite.ProcessPoolExecutor(2)
    futures = [ex.submit(work, Point(i)) for i in range(40)]
    futures[-1].add_done_callback(lambda f: print("last:", f.result(), flush=True))
    print("script done", flush=True)
"""


def test_executor_finishes_work_of_main_classes_after_the_script_ends(tmp_path):
    # Python deletes __main__.__file__ when the script ends, before the executor has sent what it
    # was given: its tasks (instances of the script's classes) must still go, by name.
    script = tmp_path / "script.py"
    script.write_text(EXIT_WITH_MAIN_CLASSES)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0 and "last: 39" in out, out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def wait_until(predicate, limit, what):
    """Bounded poll until predicate() is true; fail the test naming `what` otherwise."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("%s: not so after %s s" % (what, limit))
        time.sleep(0.01)


def run_threads(targets, limit=90):
    """Run each callable in its own thread, all released together; join them (bounded) and
    re-raise the first failure. A thread still running after `limit` seconds is a hang."""
    errors = []
    barrier = threading.Barrier(len(targets))

    def run(fn):
        try:
            barrier.wait(30)
            fn()
        except BaseException as exc:  # handed to the test's thread
            errors.append((threading.current_thread().name, exc))

    threads = [threading.Thread(target=run, args=(fn,), name="test-thread-%d" % i, daemon=True)
               for i, fn in enumerate(targets)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        pytest.fail("hang: threads %s had not finished after %s s" % (hung, limit))
    if errors:
        name, exc = errors[0]
        raise AssertionError("%d of %d threads failed; %s: %r" % (len(errors), len(targets), name, exc)) from exc


def engine_threads():
    return {t for t in threading.enumerate() if t.name.startswith(ENGINE_THREAD_NAME)}


def wait_engine_threads_gone(threads, limit=15):
    wait_until(lambda: not any(t.is_alive() for t in threads), limit,
               "engine threads %s end once their pool is stopped" % sorted(t.name for t in threads))


def wait_files(paths, limit, what):
    """Bounded wait, outside mplite, until every path exists."""
    paths = [str(p) for p in paths]
    deadline = time.monotonic() + limit
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        if time.monotonic() > deadline:
            pytest.fail("%s: %d of %d files still missing after %s s, e.g. %s"
                        % (what, len(missing), len(paths), limit, os.path.basename(missing[0])))
        time.sleep(0.01)


def make_executor(max_workers=2, method="spawn", **kwargs):
    return mplite.ProcessPoolExecutor(max_workers, mp_context=method, **kwargs)


def watched_executor(method, tmp_path):
    """A started 2-worker executor, its workers' pids and its engine thread: what a test of its
    shutdown watches go away (in place of CPython's executor._processes and manager thread)."""
    before = engine_threads()
    ex = make_executor(2, method)
    return ex, executor_pids(ex, tmp_path, 2), engine_threads() - before


def executor_pids(ex, parent_dir, n):
    """The pids of the n workers of a fresh executor (see rendezvous)."""
    folder = tempfile.mkdtemp(dir=str(parent_dir))
    return set(ex.map(rendezvous, [folder] * n, [n] * n, timeout=60))


class Executors:
    """Running executors (2 workers) shared by this module's tests, one per start method."""

    def __init__(self):
        self.executors = {}

    def get(self, method):
        if method not in self.executors:
            self.executors[method] = make_executor(2, method)
        return self.executors[method]

    def close(self):
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        for ex in self.executors.values():
            ex.shutdown(wait=True, cancel_futures=True)
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def executors():
    cache = Executors()
    yield cache
    cache.close()


@pytest.fixture
def spex(executors):
    """The shared spawn executor, for tests where the start method doesn't matter."""
    return executors.get("spawn")


# ---------------------------------------------------------------------------------------------
# TaskManager: work moves while no caller is inside mplite
# ---------------------------------------------------------------------------------------------

def test_tasks_finish_while_the_caller_waits_outside_mplite(pool, tmp_path):
    # 8 tasks on 2 workers: at least 4 rounds. The caller only watches the file system, so every
    # round after the first needs the engine to move work on its own.
    paths = [tmp_path / ("done-%d" % i) for i in range(8)]
    for i, path in enumerate(paths):
        pool.submit(Task(_bg_touch_after, str(path), 0.05, i))
    wait_files(paths, 60, "tasks finishing while no mplite call is made (no background progress?)")
    with _fault_deadline(60, "take"):
        assert sorted(pool.take(timeout=60) for _ in paths) == list(range(8))
    assert pool.open_tasks == 0
    assert pool.take() is None


@pytest.mark.parametrize("fault_method", _FAULT_METHODS)
def test_timeout_fires_while_no_caller_is_inside_mplite(fault_method, tmp_path):
    pid_file = tmp_path / "slow.pid"
    with TaskManager(2, context=fault_method, timeout=1.0) as tm:
        tm.submit(Task(_bg_pid_then_sleep, str(pid_file), 60))
        # from here on, no mplite call until the worker is gone
        wait_files([pid_file], 30, "the slow task to start")
        pid = int(pid_file.read_text())
        _FAULT_SEEN_PIDS.add(pid)
        assert wait_gone([pid], 30) == [], \
            "the worker of a task past its timeout was not stopped while no caller was inside mplite"
        with _fault_deadline(30, "take(timeout=None)"):
            result = tm.take(timeout=None)
        assert _fault_check_error_str(result).startswith("TimeoutError"), result
        assert tm.open_tasks == 0
        with _fault_deadline(60, "execute after the timeout"):
            assert tm.execute([Task(adder, i, 1) for i in range(6)], progress=False) == list(range(1, 7))


# ---------------------------------------------------------------------------------------------
# TaskManager: every method is safe from any number of threads
# ---------------------------------------------------------------------------------------------

def test_threads_execute_and_map_get_exactly_their_own_results(pool):
    # 4 threads x 20 calls x 200 tasks on one manager, values distinct per thread and per call
    def caller(tid):
        for r in range(20):
            base = tid * 1000000 + r * 1000
            if tid % 2:
                got = pool.map(functools.partial(adder, base), range(200))
            else:
                got = pool.execute([Task(adder, base, i) for i in range(200)], progress=False)
            assert got == [base + i for i in range(200)], "thread %d, call %d got others' results" % (tid, r)

    run_threads([functools.partial(caller, tid) for tid in range(4)])
    assert pool.open_tasks == 0
    assert pool.execute([Task(adder, i, i) for i in range(5)], progress=False) == [0, 2, 4, 6, 8]


def test_threads_an_exception_mode_failure_touches_only_its_own_call(xpool):
    def good(tid):
        for r in range(10):
            base = tid * 100000 + r * 1000
            tasks = [Task(sleep_return, 0.001 if i % 10 == 0 else 0, base + i) for i in range(100)]
            assert xpool.execute(tasks, progress=False) == [base + i for i in range(100)]

    def failing():
        for r in range(10):
            tasks = [Task(adder, r, i) for i in range(100)]
            tasks[50] = Task(raise_value_error, "thread-failure-%d" % r)
            with pytest.raises(ValueError, match="^thread-failure-%d$" % r):
                xpool.execute(tasks, progress=False)

    run_threads([failing] + [functools.partial(good, tid) for tid in range(1, 4)])
    assert xpool.open_tasks == 0
    assert xpool.execute([Task(adder, i, i) for i in range(5)], progress=False) == [0, 2, 4, 6, 8]
    assert xpool.take() is None


def test_threads_submit_take_and_as_completed_deliver_each_result_exactly_once(pool):
    # Round 1: 4 threads submit while 2 threads take(timeout=...) at the same time.
    n_per = 150
    expected = Counter(tid * 100000 + i for tid in range(4) for i in range(n_per))
    taken, lock, total = [], threading.Lock(), sum(expected.values())

    def submitter(tid):
        for i in range(n_per):
            assert isinstance(pool.submit(Task(adder, tid * 100000, i)), int)

    def taker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(taken) >= total:
                    return
            result = pool.take(timeout=0.2)
            if result is not None:
                with lock:
                    taken.append(result)

    run_threads([functools.partial(submitter, tid) for tid in range(4)] + [taker, taker])
    assert Counter(taken) == expected, "results lost or delivered twice"
    assert pool.open_tasks == 0
    assert pool.take() is None

    # Round 2: 3 threads submit; then 2 as_completed() and 1 take(timeout=None) loop share them.
    expected = Counter(tid * 100000 + i for tid in range(3) for i in range(n_per))
    run_threads([functools.partial(submitter, tid) for tid in range(3)])
    assert pool.open_tasks == 3 * n_per
    collected = {"as_completed-0": [], "as_completed-1": [], "take": []}

    def completer(key):
        for task, result in pool.as_completed(timeout=60):
            assert task.args[0] + task.args[1] == result
            collected[key].append(result)

    def blocking_taker():
        while True:
            result = pool.take(timeout=None)  # None once no task is open
            if result is None:
                return
            collected["take"].append(result)

    run_threads([functools.partial(completer, "as_completed-0"), functools.partial(completer, "as_completed-1"),
                 blocking_taker])
    assert Counter(r for results in collected.values() for r in results) == expected, \
        "results lost or delivered twice: %s" % {k: len(v) for k, v in collected.items()}
    assert pool.open_tasks == 0
    assert pool.take() is None


def test_stop_from_another_thread_ends_the_calls_waiting_in_it(method, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    before = engine_threads()
    tm = TaskManager(2, context=method)
    with _fault_deadline(60, "start()"):
        tm.start()
    try:
        for _ in range(2):  # both workers busy for a minute: every call below has to wait
            tm.submit(Task(_fault_marker_sleep, str(markers), 60))
        engines = engine_threads() - before
        assert engines, "a started pool has no thread named %r" % ENGINE_THREAD_NAME
        _fault_wait_files(markers, ".started", 2)
        pids = {int(name.split(".")[0]) for name in os.listdir(str(markers))}
        _FAULT_SEEN_PIDS.update(pids)
        calls = {
            "execute": lambda: tm.execute([Task(adder, 1, 2)] * 3, progress=False),
            "map": lambda: tm.map(double, range(3)),
            "take(timeout=None)": lambda: tm.take(timeout=None),
            "take(timeout=60)": lambda: tm.take(timeout=60),
            "as_completed": lambda: list(tm.as_completed()),
        }
        outcomes = {}

        def call(name):
            try:
                outcomes[name] = ("returned", calls[name]())
            except BaseException as exc:
                outcomes[name] = ("raised", exc)

        threads = [threading.Thread(target=call, args=(name,), daemon=True) for name in calls]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # let them get into their calls (one that comes after stop() raises too)
        with _fault_deadline(30, "stop() from another thread"):
            tm.stop()
        for thread in threads:
            thread.join(30)
        assert not [t for t in threads if t.is_alive()], "calls still waiting after stop(): %s" % \
            sorted(set(calls) - set(outcomes))
        for name in calls:
            kind, value = outcomes[name]
            assert kind == "raised" and isinstance(value, RuntimeError), "%s: %s %r" % (name, kind, value)
            assert str(value).strip(), "%s: a RuntimeError without a message" % name
        assert wait_gone(pids) == []
        wait_engine_threads_gone(engines)
        # and start() afterwards gives a working pool
        with _fault_deadline(60, "start() after stop()"):
            tm.start()
        assert tm.open_tasks == 0
        with _fault_deadline(60, "execute after restart"):
            assert tm.execute([Task(adder, i, 1) for i in range(6)], progress=False) == list(range(1, 7))
        assert tm.take() is None
    finally:
        with _fault_deadline(30, "stop()"):
            tm.stop()


@posix_only("fork")
def test_fork_replacements_while_threads_use_the_pool_do_not_deadlock():
    # Every task recycles its worker, so replacements are forked again and again from a parent
    # that has the engine thread and three busy caller threads.
    with TaskManager(2, context="fork", max_tasks_per_child=1) as tm:
        def caller(tid):
            for r in range(3):
                base = tid * 1000 + r * 100
                assert tm.execute([Task(adder, base, i) for i in range(8)], progress=False) == \
                    [base + i for i in range(8)]
                tm.submit(Task(adder, base, 99))

        run_threads([functools.partial(caller, tid) for tid in range(3)])
        with _fault_deadline(60, "as_completed"):
            assert sorted(r for _, r in tm.as_completed(timeout=50)) == \
                sorted(tid * 1000 + r * 100 + 99 for tid in range(3) for r in range(3))


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: construction, submit, map, context manager
# ---------------------------------------------------------------------------------------------

def test_executor_is_a_concurrent_futures_executor():
    assert issubclass(mplite.ProcessPoolExecutor, concurrent.futures.Executor)
    assert issubclass(mplite.WorkerDiedError, ChildProcessError)
    assert issubclass(mplite.WorkerDiedError, BrokenProcessPool)


@pytest.mark.parametrize("max_workers", [0, -1])
def test_executor_max_workers_must_be_positive(max_workers):
    with pytest.raises(ValueError):
        mplite.ProcessPoolExecutor(max_workers)
    with pytest.raises(ValueError):
        mplite.ProcessPoolExecutor(max_workers=max_workers, mp_context="fork")


@posix_only("fork and forkserver, and a worker's command line from /proc")
def test_executor_mp_context_forms():
    global _PARENT_MARK
    _PARENT_MARK = "set in the parent"
    try:
        # max_workers=None: the default (the CPUs this process may use); fork starts those quickly
        cases = [(1, None, "spawn"), (None, "fork", "fork"), (1, multiprocessing.get_context("fork"), "fork"),
                 (1, "forkserver", "forkserver")]
        for max_workers, mp_context, kind in cases:
            with mplite.ProcessPoolExecutor(max_workers, mp_context=mp_context) as ex:
                mark, cmdline, pid = ex.submit(_bg_worker_identity).result(timeout=60)
            assert pid != os.getpid()
            if kind == "fork":
                assert mark == "set in the parent", (mp_context, cmdline)
            else:
                assert mark is None, (mp_context, cmdline)
                assert ("spawn_main" if kind == "spawn" else "multiprocessing.forkserver") in cmdline, \
                    (mp_context, cmdline)
    finally:
        _PARENT_MARK = None


def test_executor_submit_map_and_context_manager(method, tmp_path):
    before = engine_threads()
    with make_executor(2, method) as ex:
        assert isinstance(ex, mplite.ProcessPoolExecutor)
        pids = executor_pids(ex, tmp_path, 2)
        assert len(pids) == 2 and os.getpid() not in pids
        engines = engine_threads() - before
        assert engines, "a working executor has no thread named %r" % ENGINE_THREAD_NAME
        future = ex.submit(adder, 20, b=22)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=60) == 42
        # fn is positional-only: any keyword argument is the task's own
        assert ex.submit(echo, 1, fn=2, self=3, f=4).result(timeout=60) == ((1,), {"fn": 2, "self": 3, "f": 4})
        results = ex.map(adder, range(10), range(100, 110))
        assert iter(results) is results and not isinstance(results, list)
        assert list(results) == [100 + 2 * i for i in range(10)]
        assert list(ex.map(double, range(30), chunksize=7)) == [2 * i for i in range(30)]
        assert list(ex.map(double, [])) == []
    # leaving the block shut it down: workers and engine gone, no more work accepted
    assert wait_gone(pids) == []
    wait_engine_threads_gone(engines)
    with pytest.raises(RuntimeError):
        ex.submit(adder, 1, 2)
    with pytest.raises(RuntimeError):
        list(ex.map(double, [1]))


def test_executor_map_gives_results_in_order_and_raises_at_the_failing_item(spex):
    results = spex.map(sleep_return, [0.3, 0.0, 0.1], ["slowest", "fast", "middle"])
    assert list(results) == ["slowest", "fast", "middle"]
    results = spex.map(raise_on, [1, 2, 3], [2, 2, 2])  # raise_on(2, 2) raises KeyError(2)
    assert next(results) == 1
    with pytest.raises(KeyError):
        next(results)
    assert spex.submit(adder, 1, 2).result(timeout=60) == 3


def test_executor_map_timeout(spex, tmp_path):
    gate, open_gate = str(tmp_path / "gate"), str(tmp_path / "open")
    open(open_gate, "w").close()
    got = []
    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            for result in spex.map(wait_for_file, [open_gate, open_gate, gate], [0, 1, 2], timeout=2):
                got.append(result)
    finally:
        open(gate, "w").close()
    assert got == [0, 1]
    assert spex.submit(adder, 1, 2).result(timeout=60) == 3


def test_executor_max_tasks_per_child():
    with make_executor(1, "spawn", max_tasks_per_child=3) as ex:
        pids = [ex.submit(os.getpid).result(timeout=60) for _ in range(4)]
    assert pids[0] == pids[1] == pids[2] != pids[3], pids
    assert wait_gone(set(pids)) == []
    # CPython's test_max_tasks_early_shutdown: shut down while workers are being replaced
    ex = make_executor(2, "spawn", max_tasks_per_child=1)
    futures = [ex.submit(sleep_getpid, 0.01) for _ in range(6)]
    bounded(ex.shutdown, 60)
    pids = [f.result(timeout=0) for f in futures]
    assert len(set(pids)) == 6, pids
    assert wait_gone(set(pids)) == []


def test_executor_dropped_without_shutdown_finishes_its_work_and_stops(tmp_path):
    # CPython's test_del_shutdown: the executor is dropped while its map's results are pending
    ex, pids, engines = watched_executor("spawn", tmp_path)
    results = ex.map(sleep_return, [0.1] * 6, range(-3, 3), timeout=60)
    del ex
    gc.collect()
    assert list(results) == list(range(-3, 3))
    del results
    gc.collect()
    assert wait_gone(pids, 30) == [], "the workers of a dropped executor still run"
    wait_engine_threads_gone(engines, 30)


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: future states, cancel, wait, as_completed
# ---------------------------------------------------------------------------------------------

def test_executor_future_states_and_cancel_of_a_pending_future(tmp_path):
    gate, marker, side = str(tmp_path / "gate"), str(tmp_path / "started"), str(tmp_path / "side-effect")
    with make_executor(1, "spawn") as ex:
        try:
            first = ex.submit(_bg_gated, marker, gate, "first")
            wait_until(first.running, 60, "a future whose task a worker runs is running()")
            wait_files([marker], 60, "the gated task to start")
            assert first.running() and not first.done() and not first.cancelled()
            second = ex.submit(_bg_touch_after, side, 0, "second")  # the one worker is busy
            assert not second.running() and not second.done()
            assert second.cancel() is True
            assert second.cancelled() and second.done() and not second.running()
            assert second.cancel() is True  # again: still cancelled
            assert first.cancel() is False  # running: it can't be
        finally:
            open(gate, "w").close()
        assert first.result(timeout=60) == "first"
        assert first.done() and not first.running() and not first.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            second.result(timeout=0)
        # one worker runs its work in order: had the cancelled task run, it would have run by now
        assert ex.submit(file_exists, side).result(timeout=60) is False
    assert not os.path.exists(side), "a cancelled future's task ran"


def test_executor_futures_finish_while_the_caller_waits_outside_mplite(spex, tmp_path):
    paths = [tmp_path / ("done-%d" % i) for i in range(8)]
    futures = [spex.submit(_bg_touch_after, str(path), 0.05, i) for i, path in enumerate(paths)]
    wait_files(paths, 60, "executor tasks finishing while the caller only watches files")
    wait_until(lambda: all(f.done() for f in futures), 60, "their futures done")
    assert [f.result(timeout=0) for f in futures] == list(range(8))


def test_executor_wait_and_as_completed(spex, tmp_path):
    gate, marker = str(tmp_path / "gate"), str(tmp_path / "started")
    wait, as_completed = concurrent.futures.wait, concurrent.futures.as_completed
    try:
        quick = spex.submit(adder, 20, 22)
        gated = spex.submit(_bg_gated, marker, gate, "gated")
        done, not_done = wait([quick, gated], timeout=60, return_when=concurrent.futures.FIRST_COMPLETED)
        assert (done, not_done) == ({quick}, {gated})
        failing = spex.submit(raise_value_error, "first exception")
        done, not_done = wait([gated, failing], timeout=60, return_when=concurrent.futures.FIRST_EXCEPTION)
        assert (done, not_done) == ({failing}, {gated})
        done, not_done = wait([quick, gated], timeout=0.2)  # ALL_COMPLETED: not within the time
        assert (done, not_done) == ({quick}, {gated})
        with pytest.raises(concurrent.futures.TimeoutError):
            list(as_completed([gated], timeout=0.2))
    finally:
        open(gate, "w").close()
    done, not_done = wait([quick, gated, failing], timeout=60)
    assert (done, not_done) == ({quick, gated, failing}, set())
    assert quick.result() == 42 and gated.result() == "gated"
    assert isinstance(failing.exception(), ValueError)
    more = [spex.submit(sleep_return, 0.05 * (i % 3), i) for i in range(10)]
    seen = list(as_completed(more + [quick], timeout=60))
    assert sorted(map(id, seen)) == sorted(map(id, more + [quick]))
    assert [f.result() for f in more] == list(range(10))


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: shutdown
# ---------------------------------------------------------------------------------------------

def test_executor_shutdown_wait_true_waits_for_all_work(tmp_path):
    log = tmp_path / "log.txt"
    before = engine_threads()
    ex = make_executor(2, "spawn")
    try:
        pids = executor_pids(ex, tmp_path, 2)
        engines = engine_threads() - before
        futures = [ex.submit(sleep_return, 0.2, i) for i in range(6)]
        ex.map(_fault_append, [str(log)] * 5, ["line-%d" % i for i in range(5)])  # never iterated
    finally:
        bounded(lambda: ex.shutdown(wait=True), 60)
    assert all(f.done() for f in futures), "shutdown(wait=True) returned before its work was done"
    assert [f.result(timeout=0) for f in futures] == list(range(6))
    assert sorted(_fault_lines(log)) == ["line-%d" % i for i in range(5)], "map didn't submit without iteration"
    assert wait_gone(pids) == []
    wait_engine_threads_gone(engines)
    with pytest.raises(RuntimeError):
        ex.submit(adder, 1, 2)
    bounded(ex.shutdown, 30)  # again: a no-op


def test_executor_shutdown_without_wait_returns_at_once_and_work_completes(tmp_path):
    gate = str(tmp_path / "gate")
    before = engine_threads()
    ex = make_executor(2, "spawn")
    try:
        pids = executor_pids(ex, tmp_path, 2)
        engines = engine_threads() - before
        res = ex.map(abs, range(-5, 5))  # as in CPython's test_shutdown_no_wait
        gated = [ex.submit(_bg_gated, str(tmp_path / ("started-%d" % i)), gate, i) for i in range(4)]
        # the gate is closed: a shutdown that waited for the work would not return
        bounded(lambda: ex.shutdown(wait=False), 30)
        with pytest.raises(RuntimeError):
            ex.submit(adder, 1, 2)
    finally:
        open(gate, "w").close()
    assert [f.result(timeout=60) for f in gated] == [0, 1, 2, 3]
    assert list(res) == [abs(v) for v in range(-5, 5)]
    assert wait_gone(pids, 30) == []
    wait_engine_threads_gone(engines, 30)


def test_executor_shutdown_cancel_futures(tmp_path):
    gate = str(tmp_path / "gate")
    ex = make_executor(2, "spawn")
    shutdown = threading.Thread(target=lambda: ex.shutdown(wait=True, cancel_futures=True), daemon=True)
    try:
        running = [ex.submit(_bg_gated, str(tmp_path / ("started-%d" % i)), gate, i) for i in range(2)]
        wait_files([tmp_path / ("started-%d" % i) for i in range(2)], 60, "both workers busy")
        sides = [str(tmp_path / ("side-%d" % i)) for i in range(8)]
        pending = [ex.submit(_bg_touch_after, side, 0, i) for i, side in enumerate(sides)]
        shutdown.start()
        wait_until(lambda: all(f.cancelled() or f.running() for f in pending), 30,
                   "shutdown(cancel_futures=True) cancelling the pending futures")
    finally:
        open(gate, "w").close()
    shutdown.join(60)
    assert not shutdown.is_alive(), "hang: shutdown(wait=True, cancel_futures=True)"
    assert [f.result(timeout=0) for f in running] == [0, 1]
    cancelled = [i for i, f in enumerate(pending) if f.cancelled()]
    assert len(cancelled) >= 5, "only %s of 8 pending futures were cancelled" % cancelled
    for i, f in enumerate(pending):
        assert f.done()
        if i in cancelled:
            assert not os.path.exists(sides[i]), "cancelled future %d ran" % i
        else:
            assert f.result(timeout=0) == i and os.path.exists(sides[i])


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: failures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ex_method", METHODS)
def test_executor_failing_initializer_breaks_the_pool(ex_method, tmp_path):
    init = tmp_path / "init.txt"
    ex = make_executor(2, ex_method, initializer=_fault_init_raise, initargs=(str(init), "init-boom-5521"))
    try:
        try:
            future = ex.submit(adder, 1, 2)
        except BrokenProcessPool as exc:  # perhaps already broken, as CPython's test allows
            error = exc
        else:
            error = future.exception(timeout=60)
        assert isinstance(error, BrokenProcessPool), repr(error)
        text = str(error)
        assert "init-boom-5521" in text and "ValueError" in text, text
        assert "_fault_init_raise" in text, "the initializer's traceback is not in the message:\n" + text
        wait_until(lambda: ex._broken, 30, "the executor is marked broken")
        with pytest.raises(BrokenProcessPool):
            ex.submit(adder, 1, 2)
    finally:
        bounded(lambda: ex.shutdown(wait=True), 60)
    assert _fault_pids_in(init), "the initializer never ran"
    _fault_wait_dead(_fault_pids_in(init), 10, "workers of an executor whose initializer failed")


@pytest.mark.parametrize("ex_method", METHODS)
def test_executor_a_dead_worker_fails_only_its_own_future(ex_method, tmp_path):
    dead = tmp_path / "dead.txt"
    with make_executor(2, ex_method) as ex:
        first = [ex.submit(sleep_return, 0.02, i) for i in range(6)]
        dying = {kind: ex.submit(_fault_die, kind, str(dead)) for kind in (_HARD_KILL, "exit3")}
        last = [ex.submit(sleep_return, 0.02, i) for i in range(6, 12)]
        for kind, future in dying.items():
            error = future.exception(timeout=60)
            assert isinstance(error, mplite.WorkerDiedError), repr(error)
            assert isinstance(error, ChildProcessError) and isinstance(error, BrokenProcessPool)
            _fault_check_death_text(str(error), kind)
        assert [f.result(timeout=60) for f in first + last] == list(range(12))
        assert not ex._broken
        assert ex.submit(adder, 1, 2).result(timeout=60) == 3
        assert list(ex.map(double, range(20), timeout=60)) == [2 * i for i in range(20)]
        dead_pids = _fault_pids_in(dead)
        assert len(dead_pids) == 2
    _fault_wait_dead(dead_pids, 10, "workers killed by their tasks")


@pytest.mark.parametrize("ex_method", _FAULT_METHODS)
def test_executor_timeout_fails_the_task_and_replaces_its_worker(ex_method, tmp_path):
    pid_file = tmp_path / "slow.pid"
    with make_executor(2, ex_method, timeout=1.0) as ex:
        slow = ex.submit(_bg_pid_then_sleep, str(pid_file), 60)
        quick = [ex.submit(sleep_return, 0.05, i) for i in range(6)]
        error = slow.exception(timeout=60)
        assert isinstance(error, TimeoutError), repr(error)
        assert [f.result(timeout=60) for f in quick] == list(range(6))
        pid = int(pid_file.read_text())
        _FAULT_SEEN_PIDS.add(pid)
        assert wait_gone([pid]) == [], "the worker of a task past its timeout is still running"
        assert [f.result(timeout=60) for f in [ex.submit(sleep_return, 0.05, i) for i in range(4)]] == \
            list(range(4))


def test_executor_exception_is_the_tasks_own_with_the_worker_traceback(spex):
    future = spex.submit(raise_value_error, "boom 77")
    error = future.exception(timeout=60)
    assert type(error) is ValueError and str(error) == "boom 77"
    with pytest.raises(ValueError, match="^boom 77$") as info:
        future.result()
    frames = [fr for fr in traceback.extract_tb(info.value.__traceback__)
              if os.path.basename(fr.filename) == "test_mplite.py" and fr.name == "raise_value_error"]
    assert frames, "".join(traceback.format_exception(type(info.value), info.value, info.value.__traceback__))
    assert frames[-1].lineno == raise_lineno(raise_value_error, "raise ValueError")
    text = "".join(traceback.format_exception(type(info.value), info.value, info.value.__traceback__))
    assert "raise ValueError(message)" in text, text  # what the user sees shows the worker's line
    # other types arrive as they are too
    with pytest.raises(NotImplementedError, match="this task must fail!"):
        spex.submit(broken).result(timeout=60)
    with pytest.raises(ZeroDivisionError):
        spex.submit(f, 0.0, hello=0).result(timeout=60)


def test_executor_unpicklable_arguments_and_results_fail_their_future(spex):
    bad = [spex.submit(adder, threading.Lock(), 1),  # submit() itself does not raise
           spex.submit(ignore_args, (i for i in range(3))),
           spex.submit(ignore_args, key=threading.Lock())]
    good = spex.submit(adder, 1, 2)
    for future in bad:
        error = future.exception(timeout=60)
        assert isinstance(error, (TypeError, pickle.PicklingError)), repr(error)
    assert good.result(timeout=60) == 3
    error = spex.submit(_fault_return_lock).exception(timeout=60)
    assert isinstance(error, TypeError), repr(error)
    assert spex.submit(adder, 2, 3).result(timeout=60) == 5


def test_executor_workers_keep_no_stale_references(spex, tmp_path):
    # CPython's test_ressources_gced_in_workers: the worker's copy of an argument is collected
    # once its task is done, not kept until more work comes
    path = tmp_path / "collected-in-worker"
    assert spex.submit(ignore_args, DelMarker(str(path))).result(timeout=60) is None
    wait_files([path], 15, "a finished task's argument collected in the worker")


@pytest.mark.parametrize("ex_method", _FAULT_METHODS)
def test_executor_pickling_faults_fail_only_their_own_future(ex_method):
    # After CPython's ExecutorDeadlockTest: errors, exits and crashes while arguments and results
    # are pickled and rebuilt. Each fails its own future, no other, and nothing hangs.
    with make_executor(2, ex_method) as ex:
        cases = {
            "an argument that raises when pickled": lambda: ex.submit(ignore_args, RaiseAtPickle()),
            "an argument that can't be rebuilt in the worker": lambda: ex.submit(ignore_args, BuiltOnlyHere()),
            "an argument that ends the worker when rebuilt": lambda: ex.submit(ignore_args, CrashAtUnpickle()),
            "a result that raises when pickled": lambda: ex.submit(return_instance, RaiseAtPickle),
            "a result that calls sys.exit() when pickled": lambda: ex.submit(return_instance, ExitAtPickle),
            "a result that ends the worker when pickled": lambda: ex.submit(return_instance, CrashAtPickle),
            "a result that can't be rebuilt in the parent": lambda: ex.submit(return_instance, BuiltOnlyHere),
            "an argument that calls sys.exit() when pickled": lambda: ex.submit(ignore_args, ExitAtPickle()),
            "a result that calls sys.exit() when rebuilt in the parent": lambda: ex.submit(return_instance, ExitWhenRebuilt),
        }
        for name, submit_bad in cases.items():
            before = [ex.submit(sleep_return, 0.01, i) for i in range(4)]
            bad = submit_bad()
            after = [ex.submit(sleep_return, 0.01, i) for i in range(4, 8)]
            assert bad.exception(timeout=60) is not None, name
            assert [f.result(timeout=60) for f in before + after] == list(range(8)), name
        assert ex.submit(adder, 1, 2).result(timeout=60) == 3


def test_executor_keeps_no_stale_references(spex):
    # CPython's test: the future is dropped at once; once its task is done, the object must go
    obj = StaleCheck()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    spex.submit(obj.my_method)
    del obj
    wait_until(lambda: gc.collect() is not None and collected.is_set(), 30,
               "the argument of a finished future collected")
    # an argument and a result of a future that is done and dropped
    arg = StaleCheck()
    arg_ref = weakref.ref(arg)
    future = spex.submit(ignore_args, arg)
    assert future.result(timeout=60) is None
    result_ref = weakref.ref(spex.submit(make_stale_check).result(timeout=60))
    del arg, future
    wait_until(lambda: gc.collect() is not None and arg_ref() is None and result_ref() is None, 30,
               "the argument and result of finished, dropped futures collected")
    assert ref() is None


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: threads, asyncio
# ---------------------------------------------------------------------------------------------

def test_executor_threads_submit_and_collect_their_own_futures(spex):
    def caller(tid):
        for r in range(5):
            base = tid * 100000 + r * 1000
            futures = [spex.submit(adder, base, i) for i in range(40)]
            assert [f.result(timeout=60) for f in futures] == [base + i for i in range(40)]
            assert list(spex.map(adder, [base] * 40, range(40), timeout=60)) == [base + i for i in range(40)]

    run_threads([functools.partial(caller, tid) for tid in range(4)])


def test_executor_with_asyncio(spex):
    async def main():
        loop = asyncio.get_running_loop()
        a = await asyncio.wait_for(loop.run_in_executor(spex, adder, 20, 22), 60)
        b = await asyncio.wait_for(asyncio.wrap_future(spex.submit(double, 21)), 60)
        many = await asyncio.wait_for(asyncio.gather(*[loop.run_in_executor(spex, double, i) for i in range(20)]), 60)
        with pytest.raises(ValueError, match="from asyncio"):
            await asyncio.wait_for(asyncio.wrap_future(spex.submit(raise_value_error, "from asyncio")), 60)
        return a, b, many

    assert asyncio.run(main()) == (42, 42, [2 * i for i in range(20)])


# ---------------------------------------------------------------------------------------------
# ProcessPoolExecutor: Ctrl-C, a program that ends without shutdown() (child scripts)
# ---------------------------------------------------------------------------------------------

_EXECUTOR_SCRIPT = r'''
@@PRELUDE@@


def write_later(marker_dir, seconds):
    open(os.path.join(marker_dir, "%d.started" % os.getpid()), "w").close()
    time.sleep(seconds)
    path = os.path.join(marker_dir, "finished.txt")
    with open(path + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    return seconds


def wait_started(marker_dir, n):
    deadline = time.time() + 30
    while sum(x.endswith(".started") for x in os.listdir(marker_dir)) < n and time.time() < deadline:
        time.sleep(0.02)




def main():
    scenario, method, marker_dir = sys.argv[1:4]
    if scenario == "ctrlc-result":  # Ctrl-C in Future.result(), inside the executor's with-block
        try:
            with mplite.ProcessPoolExecutor(5, mp_context=method) as ex:
                futures = [ex.submit(fault_long, marker_dir, 60) for _ in range(2)]
                wait_started(marker_dir, 2)
                write_pids(marker_dir)
                futures[0].result()
        except KeyboardInterrupt:
            interrupted(lambda: ex.submit(fault_long, marker_dir, 0))
        print("NO-KEYBOARDINTERRUPT", flush=True)
        sys.exit(3)
    if scenario == "ctrlc-as-completed":  # Ctrl-C in TaskManager.as_completed()
        tm = mplite.TaskManager(3, context=method)
        tm.start()
        for _ in range(2):
            tm.submit(mplite.Task(fault_long, marker_dir, 60))
        wait_started(marker_dir, 2)
        write_pids(marker_dir)
        try:
            for _ in tm.as_completed():
                pass
        except KeyboardInterrupt:
            interrupted(lambda: tm.submit(mplite.Task(fault_long, marker_dir, 0)))
        print("NO-KEYBOARDINTERRUPT", flush=True)
        sys.exit(3)
    ex = mplite.ProcessPoolExecutor(2, mp_context=method)
    ex.submit(write_later, marker_dir, 1.0)
    if scenario == "exit-running":
        wait_started(marker_dir, 1)
    print("LEAVING", flush=True)
    # falls off the end without shutdown()


if __name__ == "__main__":
    main()
'''


@posix_only("a terminal's Ctrl-C: SIGINT sent to a process group (os.killpg)")
@pytest.mark.parametrize("scenario,ex_method", where_available([
    ("ctrlc-result", "spawn"), ("ctrlc-result", "fork"), ("ctrlc-result", "forkserver"),
    ("ctrlc-as-completed", "spawn"), ("ctrlc-as-completed", "fork")]))
def test_ctrl_c_in_future_result_or_as_completed(scenario, ex_method, tmp_path):
    # Ctrl-C while the main thread waits in Future.result() (inside `with ProcessPoolExecutor`)
    # or in TaskManager.as_completed(): two workers run a one-minute task. The executor has five
    # workers and doesn't wait for them to start, so some may still be starting: they too must
    # not print anything.
    child = _FaultScript(tmp_path, scenario, ex_method, script=_EXECUTOR_SCRIPT)
    try:
        pids = child.worker_pids(2)
        assert len(pids) >= 2, pids
        _ctrl_c_and_check(child, pids)
    finally:
        child.cleanup()


@pytest.mark.parametrize("scenario,ex_method", where_available([("exit-running", "spawn"), ("exit-running", "fork"),
                                                                ("exit-submitted", "spawn"),
                                                                ("exit-submitted", "forkserver")]))
def test_executor_task_finishes_when_the_program_ends_without_shutdown(scenario, ex_method, tmp_path):
    # exit-running: the task had started; exit-submitted: CPython's test_interpreter_shutdown
    child = _FaultScript(tmp_path, scenario, ex_method, script=_EXECUTOR_SCRIPT)
    try:
        rc = child.wait(60)
        report = "rc=%s\nstdout:\n%s\nstderr:\n%s" % (rc, child.stdout, child.stderr)
        assert rc == 0 and "LEAVING" in child.stdout, report
        assert child.stderr.strip() == "", report
        finished = child.dir / "finished.txt"
        assert finished.exists(), "the task did not finish\n" + report
        pid = int(finished.read_text())
        child.pids = {pid}
        _FAULT_SEEN_PIDS.add(pid)
        _fault_wait_dead([pid], 5, "the worker after the program ended")
        child.assert_group_gone()
    finally:
        child.cleanup()


# =============================================================================================
# Issue 11: functions that travel by value: lambdas, closures, notebooks.
#
# Tasks defined anywhere (lambdas, closures, functions typed into a notebook, `python -c` or
# `python -`) run under spawn, forkserver and fork; what can't travel is refused up front, saying
# why and what to do; a function importable by name still goes by name. Functions that workers
# must find by name live at module level (workers import this file as ``test_mplite``); a notebook
# is imitated by exec'ing its cells in a file-less __main__, and `python -c` / `python -` are real
# scripts, each run in its own session.
# =============================================================================================

BYVALUE_CURE = "move it into a .py module"  # the words of the cure that every "can't travel" message carries


# ---------------------------------------------------------------------------------------------
# Task functions (module level: workers find them by name)
# ---------------------------------------------------------------------------------------------

def call_in_worker(f, *args):
    """Run in a worker: call a function that came to it as an argument."""
    return f(*args)


def probe_globals():
    """Run in a worker: this function's name, and whether its globals are its module's own dict.

    A function that came by name is the module's, with the module's globals; one rebuilt by value
    would have a globals dict of its own."""
    module = sys.modules.get(__name__)
    return __name__, module is not None and globals() is module.__dict__


def received_by_name(f):
    """Run in a worker: is f the very object its module holds under its name, with that module's
    globals? True only for a function that travelled by name."""
    module = sys.modules.get(f.__module__)
    return (module is not None and getattr(module, f.__qualname__, None) is f
            and f.__globals__ is module.__dict__)


_BIG_REBUILDS = [0]  # in each worker: how many times a CountedBig arrived there (was unpickled)


class CountedBig:
    """A large value; each unpickling counts, in the process that does it, in _BIG_REBUILDS."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __reduce__(self):
        return _rebuild_counted_big, (self.data,)


def _rebuild_counted_big(data):
    _BIG_REBUILDS[0] += 1
    return CountedBig(data)


def counted_big_rebuilds():
    return _BIG_REBUILDS[0]


BIG_GLOBAL = CountedBig(bytes(1 << 18))  # a global of the by-value functions of test_a_large_global_*

BYVALUE_LOCK = threading.Lock()  # a global that can't be pickled; lambdas below use `x.BYVALUE_LOCK` only

BYVALUE_INIT_MODEL = None  # set in workers by the by-value worker_init of test_by_value_worker_init_*


def make_by_value_init(tag):
    def init():  # nested: it travels by value, and writes a global of that namespace
        global BYVALUE_INIT_MODEL
        BYVALUE_INIT_MODEL = (tag, os.getpid())
    return init


# ---------------------------------------------------------------------------------------------
# What a notebook cell, a `python -c` script and a `python -` script all run
#
# The same source is exec'd in a file-less __main__ (the notebook imitation) and run as a real
# script; run_all() drives it through the public API and returns what each check gave, each check
# on its own, so one failure doesn't hide the others.
# ---------------------------------------------------------------------------------------------

# An interactive class, and functions that use it: also a cell of its own in the notebook tests.
NOTEBOOK_CLASS_CELL = '''
class Point:
    def __init__(self, x):
        self.x = x


def make_point(x):
    return Point(x)


def get_x(p):
    return p.x
'''

NOTEBOOK_CELL = '''
import math
import multiprocessing
import os
import sys
import threading
import types
import xml.dom.minidom

import mplite
from mplite import Task, TaskChain, TaskManager

SCALE = 10
model = None
tm = threading.Lock()  # a global holding a lock: `x.tm` below must not drag it along


def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)


def is_even(n):
    return True if n == 0 else is_odd(n - 1)


def is_odd(n):
    return False if n == 0 else is_even(n - 1)


def hyp(a, b=4, *, scale=1):
    return scale * math.hypot(a, b)


def tag(text):
    return xml.dom.minidom.parseString(text).documentElement.tagName


def make_adder(k):
    def add(x):
        return x + k + SCALE
    return add


def scaled(x):
    return x * SCALE


def init():
    global model
    model = {"w": 7, "pid": os.getpid()}


def predict(x):
    return model["w"] * x, model["pid"] == os.getpid()


def then_fact(prev_task, result):  # a TaskChain's next step: runs in this process
    return Task(fact, result)


attr_user = lambda x: x.tm + SCALE


def locked(x):
    with tm:
        return x


''' + NOTEBOOK_CLASS_CELL + '''

def attempt(call):
    """call()'s value, or what it raised, in words."""
    try:
        return call()
    except Exception as exc:
        return "raised %s: %s" % (type(exc).__name__, exc)


def run_all(method):
    global SCALE
    out = {}
    lock = threading.Lock()
    with TaskManager(2, context=method, worker_init=Task(init)) as pool:
        pool.submit(Task(fact, 7))  # queued before the refusals below: it must survive them
        out["lambda"] = attempt(lambda: pool.map(lambda x: x * 2, range(5)))
        out["closure"] = attempt(lambda: pool.map(make_adder(5), [1, 2]))
        out["recursive"] = attempt(lambda: pool.map(fact, [5, 10]))
        out["mutual"] = attempt(lambda: pool.map(is_even, [10, 7]))
        out["defaults"] = attempt(lambda: pool.execute(
            [Task(hyp, 3), Task(hyp, 3, 4, scale=2), Task(hyp, 6, b=8)], progress=False))
        out["module"] = attempt(lambda: pool.map(tag, ["<doc/>", "<a><b/></a>"]))
        out["worker_init"] = attempt(lambda: pool.map(predict, [1, 2]))
        out["chain"] = attempt(lambda: pool.execute([TaskChain(Task(lambda: 3), then_fact)], progress=False))
        out["attribute"] = attempt(lambda: pool.map(attr_user, [types.SimpleNamespace(tm=1)]))
        out["class"] = attempt(lambda: [getattr(p, "x", p) for p in pool.map(make_point, [1, 2])])
        out["class_argument"] = attempt(lambda: pool.execute([Task(get_x, Point(3))], progress=False))
        out["lock"] = attempt(lambda: pool.map(lambda x: lock, [1]))
        out["global_lock"] = attempt(lambda: pool.submit(Task(locked, 1)))
        out["queued"] = attempt(lambda: pool.take(timeout=60))
        ids = {pool.submit(Task(lambda a, b=1, *, c=0: a - b + c, 10, b=3, c=100)): "keywords",
               pool.submit(Task(fact, 4)): "fact"}
        out["as_completed"] = attempt(lambda: sorted((ids[t.id], v) for t, v in pool.as_completed(timeout=60)))
        pool.submit(Task(scaled, 2))
        out["take"] = attempt(lambda: pool.take(timeout=60))
        out["scale_before"] = attempt(lambda: pool.map(scaled, [1]))
        SCALE = 20  # a global changed between calls: the next call sees the new value
        out["scale_after"] = attempt(lambda: pool.map(scaled, [1]))
        SCALE = 10
    with mplite.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method), initializer=init) as ex:
        out["executor_submit"] = attempt(lambda: [ex.submit(fact, 6).result(timeout=60),
                                                  ex.submit(hyp, 3, scale=2).result(timeout=60)])
        out["executor_map"] = attempt(lambda: list(ex.map(lambda a, b: a * b + SCALE, [1, 2], [3, 4], timeout=60)))
        out["executor_closure"] = attempt(lambda: ex.submit(make_adder(1), 1).result(timeout=60))
        out["executor_init"] = attempt(lambda: ex.submit(predict, 3).result(timeout=60))
    return out
'''

NOTEBOOK_SCRIPT = NOTEBOOK_CELL + '''

if __name__ == "__main__":
    results = run_all(sys.argv[1])
    results["children"] = len(multiprocessing.active_children())
    print("RESULTS", repr(results), flush=True)
'''

NOTEBOOK_EXPECTED = {
    "lambda": [0, 2, 4, 6, 8],
    "closure": [16, 17],
    "recursive": [120, 3628800],
    "mutual": [True, False],
    "defaults": [5.0, 10.0, 10.0],
    "module": ["doc", "a"],
    "worker_init": [(7, True), (14, True)],
    "chain": [6],
    "attribute": [11],
    "queued": 5040,
    "as_completed": [("fact", 24), ("keywords", 107)],
    "take": 20,
    "scale_before": [10],
    "scale_after": [20],
    "executor_submit": [720, 10.0],
    "executor_map": [13, 18],
    "executor_closure": 12,
    "executor_init": (21, True),
}


def check_notebook_results(results, method):
    """Compare run_all()'s results with what each check must give under `method`."""
    results = dict(results)
    bad = {}
    # An interactive class: its instances can't be rebuilt in a spawned worker, so the call is
    # refused, naming the task, the class and the cure. A forked worker has the class (it was
    # defined before the pool started), and the call just works.
    for label, task, want in (("class", "Task(f=make_point", [1, 2]), ("class_argument", "Task(f=get_x", [3])):
        got = results.pop(label)
        if method == "fork":
            ok = got == want
        else:
            ok = (isinstance(got, str) and got.startswith("raised UnpicklableTaskError:")
                  and task in got and "Point" in got and BYVALUE_CURE in got)
        if not ok:
            bad[label] = got
    # What can't travel even by value: refused up front, naming the task and the culprit.
    for label, needles in (("lock", ("Task(f=<lambda>", "closure variable 'lock'")),
                           ("global_lock", ("Task(f=locked", "global 'tm'"))):
        got = results.pop(label)
        if not (isinstance(got, str) and got.startswith("raised UnpicklableTaskError:")
                and all(n in got for n in needles)):
            bad[label] = got
    for label, want in NOTEBOOK_EXPECTED.items():
        got = results.pop(label, "<missing>")
        if got != want:
            bad[label] = "got %r, want %r" % (got, want)
    return bad, results


# ---------------------------------------------------------------------------------------------
# Test helpers
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def notebook():
    """A file-less __main__, as in a notebook or a REPL, for the duration: yields its namespace.

    The functions and classes exec'd there have __module__ '__main__', and no worker can import
    that module by name. The real __main__ comes back afterwards; the functions keep their globals."""
    real = sys.modules["__main__"]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    try:
        yield main.__dict__
    finally:
        sys.modules["__main__"] = real


def run_cell(namespace, source):
    exec(compile(textwrap.dedent(source), "<cell>", "exec"), namespace)


def run_script_in_own_session(args, stdin=None, limit=120):
    """Run a Python script in its own session; (exit code, stdout, stderr). Fails on a hang, and
    unless every process of its session (workers, forkserver, resource tracker) is gone after it."""
    env = dict(os.environ, PYTHONPATH=_FAULT_REPO)
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.Popen([sys.executable] + args, cwd=cwd, env=env, start_new_session=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            try:
                out, err = proc.communicate(stdin.encode() if stdin is not None else None, timeout=limit)
            except subprocess.TimeoutExpired:
                pytest.fail("the script had not exited after %s s (hang)" % limit)
            assert_session_ends(proc, "the script")
        finally:
            kill_session(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Real scripts: python -c SRC and python - (source on stdin)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["-c", "stdin"], ids=["python-c", "python-stdin"])
def test_script_runs_functions_defined_in_it(mode, method):
    """Lambdas, closures, recursive and mutually recursive functions, defaults and keyword-only
    defaults, a module imported by the script, map, execute, chains, submit/take, as_completed,
    the executor, and a worker_init that sets `global model` for the tasks defined beside it."""
    if mode == "-c":
        code, out, err = run_script_in_own_session(["-c", NOTEBOOK_SCRIPT, method])
    else:
        code, out, err = run_script_in_own_session(["-", method], stdin=NOTEBOOK_SCRIPT)
    assert code == 0, err[-5000:]
    lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
    assert len(lines) == 1, (out, err[-3000:])
    results = ast.literal_eval(lines[0][len("RESULTS "):])
    assert results.pop("children") == 0
    bad, extra = check_notebook_results(results, method)
    assert not bad, bad
    assert not extra, extra
    assert "AttributeError" not in out + err and "Traceback" not in err, err[-3000:]


# ---------------------------------------------------------------------------------------------
# A notebook: code exec'd in a file-less __main__, in this process
# ---------------------------------------------------------------------------------------------

def test_notebook_cell_runs_functions_defined_in_it(method):
    with notebook() as ns:
        run_cell(ns, NOTEBOOK_CELL)
        results = bounded(lambda: ns["run_all"](method), 100)
    bad, extra = check_notebook_results(results, method)
    assert not bad, bad
    assert not extra, extra


@pytest.mark.parametrize("method", where_available(["spawn", "forkserver"]))
def test_notebook_class_is_refused_up_front_and_queued_work_survives(pool, method, tmp_path):
    gate = str(tmp_path / "gate")
    pool.submit(Task(wait_for_file, gate, "queued"))
    with notebook() as ns:
        run_cell(ns, NOTEBOOK_CLASS_CELL)
        point = ns["Point"](3)
        refusals = []
        with pytest.raises(mplite.UnpicklableTaskError) as info:  # the function's global is the class
            pool.map(ns["make_point"], [1, 2])
        refusals.append((info.value, "Task(f=make_point"))
        with pytest.raises(mplite.UnpicklableTaskError) as info:  # an argument is an instance
            pool.submit(Task(echo, point))
        refusals.append((info.value, "Task(f=echo"))
        with pytest.raises(mplite.UnpicklableTaskError) as info:
            pool.execute([Task(ns["get_x"], point)], progress=False)
        refusals.append((info.value, "Task(f=get_x"))
        with pytest.raises(mplite.UnpicklableTaskError) as info:
            pool.map(echo, [1, point])
        refusals.append((info.value, "Task(f=echo"))
        for exc, task in refusals:
            message = str(exc)
            assert task in message and "__main__.Point" in message and BYVALUE_CURE in message, message
            assert "fork" in message, message  # the other cure, where fork is available
        assert pool.open_tasks == 1
        with mplite.ProcessPoolExecutor(1, mp_context=method) as ex:
            future = ex.submit(echo, point)  # the executor's submit doesn't raise: its future does
            with pytest.raises(mplite.UnpicklableTaskError) as info:
                future.result(timeout=60)
            assert "__main__.Point" in str(info.value) and BYVALUE_CURE in str(info.value)
            assert ex.submit(ns["get_x"], types.SimpleNamespace(x=5)).result(timeout=60) == 5
    open(gate, "w").close()
    assert pool.take(timeout=60) == "queued"
    assert pool.map(lambda x: x + 1, [1, 2]) == [2, 3]


@posix_only("fork")
def test_fork_notebook_class_defined_before_the_pool_started_works():
    with notebook() as ns:
        run_cell(ns, NOTEBOOK_CLASS_CELL)
        with TaskManager(2, context="fork") as tm:
            points = tm.map(ns["make_point"], [1, 2])
            assert [type(p) for p in points] == [ns["Point"]] * 2, points
            assert [p.x for p in points] == [1, 2]
            assert tm.map(ns["get_x"], [ns["Point"](3)]) == [3]


@posix_only("fork")
def test_fork_notebook_class_defined_after_the_pool_started_is_no_attribute_error():
    """The worker was forked before the class existed: it can't find it by name. Either the class
    travels some other way, or the task is refused (or fails) with the cure; never an
    AttributeError about __main__ (the issue's "never a result that is an AttributeError")."""
    with notebook() as ns:
        with TaskManager(2, context="fork") as tm:
            run_cell(ns, NOTEBOOK_CLASS_CELL)  # typed after the pool started
            for call in (lambda: tm.map(ns["make_point"], [1]), lambda: tm.map(ns["get_x"], [ns["Point"](4)])):
                try:
                    results = bounded(call, 60)
                except mplite.UnpicklableTaskError as exc:
                    assert "__main__.Point" in str(exc) and BYVALUE_CURE in str(exc), str(exc)
                    continue
                for r in results:
                    if isinstance(r, str):  # str mode: a failed task's result is its traceback text
                        assert "AttributeError" not in r and BYVALUE_CURE in r, r
                    else:
                        assert r == 4 or r.x == 1, r


# ---------------------------------------------------------------------------------------------
# What can't travel even by value
# ---------------------------------------------------------------------------------------------

def test_lambda_closing_over_a_lock_is_refused_naming_task_and_variable(pool, tmp_path):
    gate = str(tmp_path / "gate")
    pool.submit(Task(wait_for_file, gate, "queued"))
    lock = threading.Lock()
    with pytest.raises(mplite.UnpicklableTaskError) as info:
        pool.map(lambda x: lock, [1, 2])
    message = str(info.value)
    assert "Task(f=<lambda>" in message and "closure variable 'lock'" in message, message
    with pytest.raises(mplite.UnpicklableTaskError) as info:
        pool.submit(Task(lambda: lock.locked()))
    assert "Task(f=<lambda>" in str(info.value) and "closure variable 'lock'" in str(info.value)

    def uses_global_lock():
        return BYVALUE_LOCK.locked()

    with pytest.raises(mplite.UnpicklableTaskError) as info:
        pool.execute([Task(uses_global_lock)], progress=False)
    assert "Task(f=uses_global_lock" in str(info.value) and "global 'BYVALUE_LOCK'" in str(info.value)
    assert pool.open_tasks == 1
    open(gate, "w").close()
    assert pool.take(timeout=60) == "queued"
    assert pool.map(lambda x: x * 3, [1, 2]) == [3, 6]


def test_notebook_function_using_a_global_lock_is_refused_naming_the_global(pool):
    with notebook() as ns:
        run_cell(ns, """
            import threading
            tm = threading.Lock()
            def locked(x):
                with tm:
                    return x
        """)
        with pytest.raises(mplite.UnpicklableTaskError) as info:
            pool.map(ns["locked"], [1])
    message = str(info.value)
    assert "Task(f=locked" in message and "global 'tm'" in message and "lock" in message, message


def test_executor_lambda_closing_over_a_lock_fails_its_future_only():
    lock = threading.Lock()
    with mplite.ProcessPoolExecutor(1) as ex:
        bad = ex.submit(lambda: lock)
        good = ex.submit(lambda: 42)
        with pytest.raises(mplite.UnpicklableTaskError) as info:
            bad.result(timeout=60)
        assert "closure variable 'lock'" in str(info.value)
        assert good.result(timeout=60) == 42


# ---------------------------------------------------------------------------------------------
# By name where possible, by value where needed: checked by what the worker receives
# ---------------------------------------------------------------------------------------------

def test_module_level_function_still_goes_by_name(pool):
    assert pool.execute([Task(probe_globals)], progress=False) == [("test_mplite", True)]
    assert pool.execute([Task(received_by_name, probe_globals)], progress=False) == [True]
    assert pool.map(received_by_name, [echo, received_by_name]) == [True, True]


def test_lambdas_and_local_functions_go_by_value(pool):
    def local():
        return 1

    # A function rebuilt from its value is not the module's own object; as its module can be
    # imported by the worker, it runs with that module's globals, as the module's functions do.
    assert pool.map(received_by_name, [lambda: 0, local]) == [False, False]
    module_globals = lambda _: globals() is getattr(sys.modules.get(__name__), "__dict__", None)
    assert pool.map(module_globals, [0]) == [True]
    assert pool.execute([Task(call_in_worker, module_globals, 0)], progress=False) == [True]


def test_attribute_names_do_not_drag_globals_along(pool):
    """BYVALUE_LOCK (module) and tm (notebook) are globals holding locks; the code uses only
    attributes of those names, so the functions travel without them."""
    x = types.SimpleNamespace(BYVALUE_LOCK=2, tm=5)
    assert pool.map(lambda v: v.BYVALUE_LOCK * 10, [x]) == [20]
    assert pool.map(lambda vs: [v.BYVALUE_LOCK for v in vs], [[x, x]]) == [[2, 2]]  # nested code too

    def setter(v):
        v.BYVALUE_LOCK = 7
        return v.BYVALUE_LOCK

    assert pool.map(setter, [x]) == [7]
    with notebook() as ns:
        run_cell(ns, """
            import threading
            tm = threading.Lock()
            ONE = 1
            get_tm = lambda x: x.tm + ONE
            def set_tm(x):
                x.tm = ONE
                return x.tm
        """)
        assert pool.map(ns["get_tm"], [x]) == [6]
        assert pool.map(ns["set_tm"], [x]) == [1]


def test_by_value_worker_init_sets_a_global_seen_by_by_value_tasks(method):
    """A worker_init sent by value writes `global BYVALUE_INIT_MODEL`; lambdas of the same module (sent
    by value too, to the same namespace in the worker) see the worker's value, not the parent's
    stale None."""
    with TaskManager(2, context=method, worker_init=Task(make_by_value_init("ready"))) as tm:
        results = tm.map(lambda _: (BYVALUE_INIT_MODEL, os.getpid()), range(8))
    for (tag_pid, pid) in results:
        assert tag_pid == ("ready", pid), results


def test_a_large_global_is_sent_once_per_worker_within_a_call(method):
    """BIG_GLOBAL (256 KiB) is a global of the task function; each worker unpickles it once per call,
    not with every message, though each call sends many (a task of 2 ms travels alone or in
    pairs); a later call brings it at most once more. This module is one the workers import, so
    the lambda uses its globals there, as the module's own functions do: rebinding BIG_GLOBAL here
    changes nothing there (a notebook's globals do follow: see NOTEBOOK_CELL)."""
    global BIG_GLOBAL
    task = lambda x: (time.sleep(0.002), os.getpid(), counted_big_rebuilds(), len(BIG_GLOBAL))[1:]
    original = BIG_GLOBAL
    with TaskManager(2, context=method) as tm:
        try:
            results = tm.map(task, range(300))
            seen = {}
            for pid, rebuilt, size in results:
                seen.setdefault(pid, set()).add(rebuilt)
                assert size == len(original)
            assert all(counts == {1} for counts in seen.values()), seen
            assert max(Counter(pid for pid, _, _ in results).values()) > 10  # many messages per worker
            results = tm.map(task, range(100))
            later = {}
            for pid, rebuilt, size in results:
                later.setdefault(pid, set()).add(rebuilt)
            assert all(len(counts) == 1 and counts <= {1, 2} for counts in later.values()), later
            BIG_GLOBAL = CountedBig(bytes(100))
            assert {size for _, _, size in tm.map(task, range(20))} == {len(original)}
        finally:
            BIG_GLOBAL = original


MAIN_GUARD_SCRIPT = """
import sys
import mplite
from mplite import Task, TaskManager

def top(x):
    return x + 1

if __name__ == "__main__":
    def double(x):  # spawned workers run this script as __mp_main__, without this block
        return 2 * x

    def uses_both(x):
        return double(top(x))

    with TaskManager(2, context=sys.argv[1]) as tm:
        print(tm.map(double, range(3)), tm.map(uses_both, [1]), tm.map(top, [1]))
        tm.submit(Task(double, 21))
        print(tm.take(timeout=60))
    with mplite.ProcessPoolExecutor(2, mp_context=sys.argv[1]) as ex:
        print(list(ex.map(double, [5])))
"""


@pytest.mark.parametrize("method", where_available(["spawn", "forkserver"]))
def test_functions_defined_under_the_main_guard_travel_by_value(method, tmp_path):
    # By name, the workers would answer "AttributeError: Can't get attribute 'double' on
    # <module '__mp_main__'>": the block that defines it is not run there.
    script = tmp_path / "guarded.py"
    script.write_text(MAIN_GUARD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, str(script), method], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out
    assert out.splitlines() == ["[0, 2, 4] [4] [2]", "42", "[10]"], out


# ---------------------------------------------------------------------------------------------
# Last: nothing left behind
# ---------------------------------------------------------------------------------------------

def _fault_fork_then_die(path):
    pid = os.fork()
    if pid == 0:  # a grandchild that outlives its worker, holding whatever the worker held open
        time.sleep(60)
        os._exit(0)
    _fault_append(path, str(pid))
    os.kill(os.getpid(), signal.SIGKILL)


@posix_only("os.fork in a task")
@pytest.mark.skipif(not hasattr(os, "pidfd_open") or mplite._PORTABLE,
                    reason="needs os.pidfd_open (Python 3.9+ on Linux) and the POSIX path; without "
                    "them the worker's death is seen only when its child ends (README: Platforms)")
@pytest.mark.parametrize("fault_method", where_available(_FAULT_METHODS + ["forkserver"]))
def test_fault_worker_death_seen_while_its_forked_child_lives(fault_method, tmp_path):
    # The worker's own child inherits its end of the sentinel pipe: the death must be seen anyway.
    grandchildren = tmp_path / "grandchildren"
    try:
        with TaskManager(2, fault_method) as tm, _fault_deadline(30, "execute with a grandchild alive"):
            results = tm.execute([Task(_fault_fork_then_die, str(grandchildren)), Task(_fault_work, 1)],
                                 progress=False)
        assert "ChildProcessError" in results[0] and "SIGKILL" in results[0], results[0]
        assert results[1] == 11
    finally:
        for pid in _fault_pids_in(grandchildren):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_fault_zz_no_stray_processes_left():
    gc.collect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = sorted(p for p in _FAULT_SEEN_PIDS if _fault_alive(p))
        active = {p.pid for p in multiprocessing.active_children()}  # reaps finished children
        unknown = {p: s for p, s in _fault_descendants().items() if p not in active}
        if not alive and not unknown:
            break
        time.sleep(0.1)
    assert not alive, "worker processes of these tests still running: %s" % alive
    assert not unknown, "processes (or zombies) left behind: %s" % unknown


# =============================================================================================
# Issue 8: imap, buffersize, and faults inside the fast path of many tiny tasks
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# Task functions (module level)
# ---------------------------------------------------------------------------------------------

def jitter(x):
    """x * 10 after a short sleep that varies with x, so that tasks finish out of input order."""
    time.sleep(((x * 37) % 7) * 0.004)
    return x * 10


def bad_at(x, bad):
    if x == bad:
        raise ValueError("bad item %d" % x)
    return x * 3


def logged(i, log, die_at=-1, bad_at=-1, lock_at=-1, slow_at=-1):
    """Log i (one O_APPEND write) before anything else, then: die, raise, return a lock, sleep, or
    return i * 3. Every call that starts is in the log, so a task run twice shows up twice."""
    _fault_append(log, str(i))
    if i == die_at:
        kill_hard(os.getpid())
        time.sleep(10)
    if i == bad_at:
        raise ValueError("bad-%d" % i)
    if i == lock_at:
        return threading.Lock()  # can't be pickled back to the parent
    if i == slow_at:
        time.sleep(20)
    return i * 3


def logged_sleep(i, log, seconds):
    _fault_append(log, str(i))
    time.sleep(seconds)
    return i


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class Counting:
    """An input that counts how many items it has handed out (it may be read from any thread)."""

    def __init__(self, n=None, fail_after=None):
        self.n, self.fail_after, self.yielded = n, fail_after, 0

    def __iter__(self):
        source = itertools.count() if self.n is None else range(self.n)
        for i in source:
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("the input broke at %d" % i)
            self.yielded += 1
            yield i


def runs(log):
    return Counter(int(x) for x in _fault_lines(log))


def new_threads(baseline, limit=10):
    """Threads started since `baseline` that are still alive after a bounded wait."""
    deadline = time.monotonic() + limit
    while True:
        extra = [t for t in threading.enumerate() if t not in baseline]
        if not extra or time.monotonic() > deadline:
            return sorted(t.name for t in extra)
        time.sleep(0.02)


def assert_pool_clean(tm):
    """No open task, no stale result waiting in take(), and the pool still works."""
    assert tm.open_tasks == 0
    assert tm.take() is None
    assert tm.execute([Task(adder, i, 1) for i in range(10)], progress=False) == list(range(1, 11))
    assert tm.map(double, range(5)) == [0, 2, 4, 6, 8]
    tid = tm.submit(Task(adder, 1000, 1))
    assert isinstance(tid, int)
    assert tm.take(timeout=None) == 1001
    assert tm.take() is None and tm.open_tasks == 0


# ---------------------------------------------------------------------------------------------
# imap: results, order, laziness
# ---------------------------------------------------------------------------------------------

def test_imap_results_come_in_input_order(pool):
    with _fault_deadline(60, "imap"):
        it = pool.imap(jitter, range(60))
        assert iter(it) is it
        assert list(it) == [x * 10 for x in range(60)]
        assert list(pool.imap(double, [])) == []
        assert list(pool.imap(double, (x for x in range(7)))) == [2 * x for x in range(7)]
    assert pool.open_tasks == 0


def test_imap_takes_timeout_as_keyword_only():
    params = inspect.signature(TaskManager.imap).parameters
    assert list(params)[:3] == ["self", "f", "iterable"]
    assert params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY


def test_map_keeps_its_signature_and_results(spool):
    params = inspect.signature(TaskManager.map).parameters
    assert list(params) == ["self", "f", "iterable", "progress", "timeout"]
    assert params["progress"].kind is inspect.Parameter.KEYWORD_ONLY and params["progress"].default is False
    assert params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    with _fault_deadline(60, "map"):
        result = spool.map(jitter, range(30))
        assert type(result) is list and result == [x * 10 for x in range(30)]
        assert spool.map(double, iter(range(5))) == [0, 2, 4, 6, 8]


def test_imap_reads_its_input_lazily(spool):
    source = Counting(100_000)
    with _fault_deadline(60, "imap"):
        it = spool.imap(double, source)
        taken = [next(it) for _ in range(10)]
        assert taken == [2 * i for i in range(10)]
        assert source.yielded < 5_000, "after 10 results, %d of 100000 inputs were read" % source.yielded
        # the read-ahead is capped: a consumer far along doesn't make it read the whole input
        for _ in range(20_000 - 10):
            next(it)
        assert source.yielded < 20_000 + 10_000, "after 20000 results, %d inputs were read" % source.yielded
        at_close = source.yielded
        it.close()
    assert spool.open_tasks == 0
    assert source.yielded == at_close, "a closed imap went on reading its input"
    assert_pool_clean(spool)
    assert source.yielded == at_close


def test_imap_of_an_infinite_input(spool):
    source = Counting()  # itertools.count()
    with _fault_deadline(60, "imap"):
        it = spool.imap(double, source)
        assert list(itertools.islice(it, 1000)) == [2 * i for i in range(1000)]
        assert source.yielded < 1000 + 10_000
        it.close()
        assert list(itertools.islice(spool.imap(double, itertools.count()), 5)) == [0, 2, 4, 6, 8]
    gc.collect()
    assert_pool_clean(spool)


def test_imap_with_a_lambda(pool):
    with _fault_deadline(60, "imap"):
        assert list(pool.imap(lambda x: x + 1, range(10))) == list(range(1, 11))
        offset = 100
        assert list(pool.imap(lambda x: x + offset, range(3))) == [100, 101, 102]


# ---------------------------------------------------------------------------------------------
# imap: closed early
# ---------------------------------------------------------------------------------------------

def test_imap_closed_early_drops_the_rest(spool, tmp_path):
    log = str(tmp_path / "log.txt")
    spool.execute([Task(adder, 1, 1)], progress=False)  # the pool is up before the baseline
    baseline = set(threading.enumerate())
    source = Counting(50)
    with _fault_deadline(60, "imap"):
        it = spool.imap(lambda i: logged_sleep(i, log, 0.2), source)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        it.close()
        assert spool.open_tasks == 0
        with pytest.raises(StopIteration):
            next(it)
        # the workers run what the engine gives them in order: once these are done, anything of
        # the closed imap that was still going to run would have run
        assert spool.execute([Task(sleep_return, 0.3, i) for i in range(4)], progress=False) == [0, 1, 2, 3]
    ran = runs(log)
    assert max(ran.values()) == 1, "an imap task ran twice: %s" % ran
    assert len(ran) < 30, "closing the imap did not drop its remaining tasks: %d of 50 ran" % len(ran)
    assert source.yielded < 50
    assert new_threads(baseline) == []
    assert_pool_clean(spool)
    assert runs(log) == ran, "tasks of the closed imap ran later"


def test_imap_dropped_by_break_leaves_nothing_behind(pool, tmp_path):
    log = str(tmp_path / "log.txt")
    pool.execute([Task(adder, 1, 1)], progress=False)
    baseline = set(threading.enumerate())
    got = []
    with _fault_deadline(60, "imap"):
        for result in pool.imap(lambda i: logged_sleep(i, log, 0.1), range(40)):
            got.append(result)
            if len(got) == 4:
                break
        gc.collect()
        assert got == [0, 1, 2, 3]
        wait_until(lambda: pool.open_tasks == 0, 10, "open_tasks back to 0 after the dropped imap")
        assert pool.execute([Task(sleep_return, 0.2, i) for i in range(4)], progress=False) == [0, 1, 2, 3]
    assert len(runs(log)) < 40
    assert new_threads(baseline) == []
    assert_pool_clean(pool)


def test_imap_closed_before_the_first_result(spool):
    with _fault_deadline(60, "imap"):
        it = spool.imap(double, range(1000))
        it.close()
        it2 = spool.imap(double, range(1000))
        del it2
        gc.collect()
    assert_pool_clean(spool)


# ---------------------------------------------------------------------------------------------
# imap: errors, a broken input, a dead worker, timeout
# ---------------------------------------------------------------------------------------------

def test_imap_str_mode_failed_item_is_its_traceback_text(pool):
    with _fault_deadline(60, "imap"):
        results = list(pool.imap(lambda x: bad_at(x, 3), range(6)))
    assert results[:3] + results[4:] == [0, 3, 6, 12, 15]
    assert _fault_check_error_str(results[3], "bad_at") == "ValueError: bad item 3"
    assert pool.open_tasks == 0


def test_imap_exception_mode_raises_at_the_failing_item(xpool):
    with _fault_deadline(60, "imap"):
        it = xpool.imap(lambda x: bad_at(x, 3), range(6))
        assert [next(it), next(it), next(it)] == [0, 3, 6]
        with pytest.raises(ValueError, match="^bad item 3$") as excinfo:
            next(it)
        it.close()
        assert xpool.open_tasks == 0
        assert xpool.execute([Task(adder, i, i) for i in range(5)], progress=False) == [0, 2, 4, 6, 8]
        assert list(xpool.imap(double, range(5))) == [0, 2, 4, 6, 8]


def test_imap_input_that_raises(pool):
    source = Counting(100, fail_after=5)
    with _fault_deadline(60, "imap"):
        it = pool.imap(double, source)
        assert [next(it) for _ in range(5)] == [0, 2, 4, 6, 8]
        with pytest.raises(RuntimeError, match="the input broke at 5"):
            next(it)
        it.close()
    assert_pool_clean(pool)


def test_imap_input_that_raises_at_once_exception_mode(xpool):
    with _fault_deadline(60, "imap"):
        it = xpool.imap(double, Counting(100, fail_after=0))
        with pytest.raises(RuntimeError, match="the input broke at 0"):
            next(it)
        it.close()
        assert xpool.open_tasks == 0
        assert list(xpool.imap(double, range(3))) == [0, 2, 4]


def test_imap_a_worker_killed_mid_imap_costs_only_its_item(method, tmp_path):
    log = str(tmp_path / "log.txt")
    n, die_at = 40, 17
    with TaskManager(2, context=method) as tm:
        with _fault_deadline(90, "imap"):
            results = list(tm.imap(lambda i: logged(i, log, die_at=die_at), range(n)))
        assert _fault_check_error_str(results[die_at], KILLED).startswith("ChildProcessError"), results[die_at]
        assert results[:die_at] + results[die_at + 1:] == [i * 3 for i in range(n) if i != die_at]
        assert runs(log) == Counter(range(n)), "tasks run twice or never: %s" % runs(log)
        assert tm.open_tasks == 0
        with _fault_deadline(60, "execute after the death"):
            assert tm.execute([Task(adder, i, 1) for i in range(10)], progress=False) == list(range(1, 11))


def warm():
    """worker_init: the worker imports this module before its first task, so that the import (over
    a second on a loaded machine) isn't counted in a task's timeout, nor in a replacement's."""


def test_imap_timeout(tmp_path):
    log = str(tmp_path / "log.txt")
    with TaskManager(2, worker_init=Task(warm)) as tm:
        with _fault_deadline(60, "imap"):
            results = list(tm.imap(lambda i: logged(i, log, slow_at=2), range(8), timeout=1.0))
        assert _fault_check_error_str(results[2]).startswith("TimeoutError"), results[2]
        assert results[:2] + results[3:] == [i * 3 for i in range(8) if i != 2]
        assert runs(log) == Counter(range(8))
        assert_pool_clean(tm)


def test_imap_timeout_exception_mode(tmp_path):
    log = str(tmp_path / "log.txt")
    with TaskManager(2, worker_init=Task(warm), error_mode="exception", timeout=1.0) as tm:  # the default applies
        with _fault_deadline(60, "imap"):
            it = tm.imap(lambda i: logged(i, log, slow_at=2), range(8))
            assert [next(it), next(it)] == [0, 3]
            with pytest.raises(TimeoutError):
                next(it)
            it.close()
            assert tm.open_tasks == 0
            assert list(tm.imap(double, range(3), timeout=None)) == [0, 2, 4]


def test_imap_from_several_threads_on_one_manager(pool):
    def caller(tid):
        for r in range(5):
            base = tid * 1_000_000 + r * 1000
            got = list(pool.imap(functools.partial(adder, base), range(300)))
            assert got == [base + i for i in range(300)], "thread %d, call %d got others' results" % (tid, r)
        it = pool.imap(functools.partial(adder, tid), range(1000))
        assert [next(it) for _ in range(5)] == [tid + i for i in range(5)]
        it.close()

    run_threads([lambda tid=tid: caller(tid) for tid in range(4)])
    assert_pool_clean(pool)


# ---------------------------------------------------------------------------------------------
# Faults in the fast path: one bad item among 20,000 tiny tasks
# ---------------------------------------------------------------------------------------------

N_TINY, BAD = 20_000, 7_777


@pytest.mark.parametrize("fault_method", where_available(["spawn", "fork"]))
def test_tiny_tasks_one_worker_killed(fault_method, tmp_path):
    log = str(tmp_path / "log.txt")
    with TaskManager(2, context=fault_method) as tm:
        with _fault_deadline(90, "execute"):
            res = tm.execute([Task(logged, i, log, BAD) for i in range(N_TINY)], progress=False)
        assert _fault_check_error_str(res[BAD], KILLED, "logged").startswith("ChildProcessError"), res[BAD]
        wrong = [i for i in range(N_TINY) if i != BAD and res[i] != i * 3]
        assert not wrong, "wrong results at %s" % wrong[:20]
        ran = runs(log)
        assert ran == Counter(range(N_TINY)), "ran twice: %s; never ran: %s" % (
            sorted(k for k, v in ran.items() if v > 1)[:20], sorted(set(range(N_TINY)) - set(ran))[:20])
        with _fault_deadline(60, "execute after"):
            assert tm.execute([Task(adder, i, 1) for i in range(100)], progress=False) == list(range(1, 101))


EXTREME_INTS = (-2 ** 63 + 1, 2 ** 63 - 1, 0, -1)


def extreme_int(i, smallest_at):
    """Ints at the edges of what a journal's word holds; at smallest_at, the smallest int64, which
    no word holds (the worker's answers then take bytes, in the same journal)."""
    return -2 ** 63 if i == smallest_at else EXTREME_INTS[i % 4]


def logged_extreme(i, log, die_at, smallest_at):
    logged(i, log, die_at)
    return extreme_int(i, smallest_at)


@pytest.mark.parametrize("smallest_at", [-1, 1995])
def test_tiny_tasks_a_dead_workers_journal_of_ints_is_read_whole(tmp_path, smallest_at):
    # A killed worker's answers that it journaled and did not send yet are read from its journal:
    # where they are ints, each is a word of it, whatever its value (0 and the extremes included).
    log = str(tmp_path / "log.txt")
    f = functools.partial(logged_extreme, log=log, die_at=2000, smallest_at=smallest_at)
    with TaskManager(1, context=FAST_METHOD) as tm:
        with _fault_deadline(90, "map"):
            res = tm.map(f, range(3000))
    assert _fault_check_error_str(res[2000], KILLED), res[2000]
    expected = [extreme_int(i, smallest_at) for i in range(3000)]
    assert [r for i, r in enumerate(res) if i != 2000] == expected[:2000] + expected[2001:]
    assert runs(log) == Counter(range(3000))


def test_tiny_tasks_one_worker_killed_imap(tmp_path):
    log = str(tmp_path / "log.txt")
    with TaskManager(2, context=FAST_METHOD) as tm:
        with _fault_deadline(90, "imap"):
            res = list(tm.imap(functools.partial(logged, log=log, die_at=BAD), range(N_TINY)))
        assert _fault_check_error_str(res[BAD], KILLED), res[BAD]
        assert [r for i, r in enumerate(res) if i != BAD] == [i * 3 for i in range(N_TINY) if i != BAD]
        assert runs(log) == Counter(range(N_TINY))


@pytest.mark.parametrize("how", ["execute", "map", "imap"])
def test_tiny_tasks_one_exception(spool, tmp_path, how):
    log = str(tmp_path / "log.txt")
    with _fault_deadline(90, how):
        if how == "execute":
            res = spool.execute([Task(logged, i, log, -1, BAD) for i in range(N_TINY)], progress=False)
        elif how == "map":
            res = spool.map(functools.partial(logged, log=log, bad_at=BAD), range(N_TINY))
        else:
            res = list(spool.imap(functools.partial(logged, log=log, bad_at=BAD), range(N_TINY)))
    assert _fault_check_error_str(res[BAD]) == "ValueError: bad-%d" % BAD, res[BAD]
    assert [r for i, r in enumerate(res) if i != BAD] == [i * 3 for i in range(N_TINY) if i != BAD]
    assert runs(log) == Counter(range(N_TINY))
    assert spool.open_tasks == 0


@pytest.mark.parametrize("how", ["execute", "imap"])
def test_tiny_tasks_one_unpicklable_result(spool, tmp_path, how):
    log = str(tmp_path / "log.txt")
    with _fault_deadline(90, how):
        if how == "execute":
            res = spool.execute([Task(logged, i, log, -1, -1, BAD) for i in range(N_TINY)], progress=False)
        else:
            res = list(spool.imap(functools.partial(logged, log=log, lock_at=BAD), range(N_TINY)))
    _fault_check_error_str(res[BAD])
    assert "pickle" in res[BAD].lower(), res[BAD]
    assert [r for i, r in enumerate(res) if i != BAD] == [i * 3 for i in range(N_TINY) if i != BAD]
    assert runs(log) == Counter(range(N_TINY))
    assert spool.open_tasks == 0


def test_tiny_tasks_exception_mode_stops_at_the_bad_item(pools, tmp_path):
    xpool = pools.get("spawn", "exception")
    log = str(tmp_path / "log.txt")
    with _fault_deadline(90, "execute"):
        with pytest.raises(ValueError, match="^bad-%d$" % BAD):
            xpool.execute([Task(logged, i, log, -1, BAD) for i in range(N_TINY)], progress=False)
        assert max(runs(log).values()) == 1
        it = xpool.imap(functools.partial(logged, log=log + "2", bad_at=BAD), range(N_TINY))
        for i in range(BAD):
            assert next(it) == i * 3
        with pytest.raises(ValueError, match="^bad-%d$" % BAD):
            next(it)
        it.close()
        assert xpool.open_tasks == 0
        assert xpool.execute([Task(adder, i, 1) for i in range(100)], progress=False) == list(range(1, 101))
    assert max(runs(log + "2").values()) == 1


def stop_at(i, at):
    """A task that raises StopIteration at one input: it must not end the loop that runs a batch."""
    if i == at:
        raise StopIteration("no more after %d" % i)
    return i * 3


GROWING = []


def grow(i):
    """Returns the same list each time, grown: a batch's answers must be the list as each task left it."""
    GROWING.append(i)
    return GROWING


def same(x):
    return x


@pytest.mark.parametrize("how", ["execute", "map", "imap", "submit", "executor"])
def test_tiny_tasks_stop_iteration_is_the_task_error(pool, pools, method, how):
    # A task that raises StopIteration fails alone: a loop that calls tasks in C must not take it
    # for its own end, drop the rest of the batch, or lose that task's answer (even the last one).
    n, at = 3000, [5, 1023, 1024, 2999]
    with _fault_deadline(90, how):
        if how == "execute":
            res = pool.execute([Task(stop_at, i, at[i % 4]) for i in range(n)], progress=False)
        elif how == "map":
            res = [pool.map(functools.partial(stop_at, at=a), range(n)) for a in at]
        elif how == "imap":
            res = [list(pool.imap(functools.partial(stop_at, at=a), range(n))) for a in at]
        elif how == "submit":
            ids = {pool.submit(Task(stop_at, i, 7)): i for i in range(50)}
            got = {task.id: result for task, result in pool.as_completed(timeout=60)}
            res = [got[tid] for tid, i in sorted(ids.items(), key=lambda kv: kv[1])]
        else:
            ex = mplite.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method))
            try:
                futures = [ex.submit(stop_at, i, 3) for i in range(10)]
                res = [f.result() if f.exception(timeout=60) is None else
                       "".join(traceback.format_exception(type(f.exception()), f.exception(), None)) for f in futures]
                assert type(futures[3].exception()) is StopIteration
                assert list(ex.map(functools.partial(stop_at, at=10**9), range(2000))) == [i * 3 for i in range(2000)]
            finally:
                ex.shutdown()
    if how == "execute":
        bad = {i for i in range(n) if i == at[i % 4]}
        rows = [(res, bad)]
    elif how in ("map", "imap"):
        rows = [(r, {a}) for r, a in zip(res, at) if a < n]
    else:
        rows = [(res, {7} if how == "submit" else {3})]
    for got, bad in rows:
        assert len(got) == {"submit": 50, "executor": 10}.get(how, n)
        for i, r in enumerate(got):
            if i in bad:  # its own exception, with its message and traceback
                assert isinstance(r, str) and "StopIteration: no more after %d" % i in r and "stop_at" in r, r
            else:
                assert r == i * 3, (i, r)
    assert pool.open_tasks == 0


def test_tiny_tasks_results_keep_their_types_and_their_value_at_the_task_end(pool):
    # Plain results travel marshalled, the rest pickled: no type may change on the way (a bytearray
    # is no bytes, a bool no int, a subclass no base), and a result is what it was as its task ended.
    values = [True, False, 2 ** 100, -1, 1.5, float("inf"), "s", "é" * 3, b"b", None, 1j, bytearray(b"a"),
              (1, [2, "x"]), [1, 2], {"a": {1, 2}}, frozenset({3}), Counter(a=1), range(3), ValueError("v")]
    with _fault_deadline(60, "map"):
        got = pool.map(same, values)
        listed = pool.execute([Task(same, v) for v in values[:11]], progress=False)  # all plain: one list
    for v, r in zip(values, got):
        assert type(r) is type(v), (v, r)
        assert r == v or isinstance(v, ValueError) and r.args == v.args, (v, r)
    assert [type(r) for r in listed] == [type(v) for v in values[:11]] and listed == values[:11]
    with _fault_deadline(60, "map"):
        grown = pool.map(grow, range(200))
    for i, r in enumerate(grown):
        assert r[-1] == i, "the answer of task %d is not the list as it left it: %r" % (i, r[-5:])


class Level(enum.IntEnum):
    LOW = 1


class Price(float):
    pass


def filler(i):
    """A result for a journal of 1 MB: mostly small ints and floats, some large, one too large for it."""
    if i == 1500:
        return b"L" * (2 << 20)  # larger than the journal: it goes on its own
    if i % 1000 == 500:  # marshalled, 20 bytes short of the journal's end: no room for 8 floats after it
        return b"E" * (mplite._JOURNAL_SIZE - mplite._JOURNAL_DATA - 25)
    if i % 20 == 7:
        return bytes([i % 256]) * (100 << 10)  # ten of these fill it
    return float(i) if i % 2 else i


def test_tiny_tasks_results_keep_their_types_across_a_full_journal(pool):
    # A worker writes ints into its journal's words as they are (while a message's answers are
    # all ints), floats in marshal's bytes, and checks the room left only every few tasks: ints
    # and floats at the edges of those encodings, answers of one encoding after the other's, and
    # answers that fill the journal (by bytes, and by count: 50,000 items go in messages of
    # 4,096) keep their values and types.
    ints = [2 ** 63 - 1, -2 ** 63 + 1, 0, -1, 2 ** 31, -2 ** 31 - 1]
    edges = ints + [2 ** 63, -2 ** 63, 0, -0.0, 1e308, 5e-324, float("-inf"), float("nan"), Level.LOW,
                    Price(2.5), True, 2 ** 31 - 1, -2 ** 31]
    with _fault_deadline(120, "map"):
        got = pool.map(same, edges * 300)
        filled = pool.map(filler, range(3000))
        counted = pool.map(same, list(range(-25000, 25000)))
        only_ints = pool.map(same, ints * 1000)
    for v, r in zip(edges * 300, got):
        assert type(r) is type(v) and (r == v or math.isnan(v) and math.isnan(r)), (v, r)
    assert str(got[len(ints) + 3]) == "-0.0"
    assert only_ints == ints * 1000 and {type(r) for r in only_ints} == {int}
    assert filled == [filler(i) for i in range(3000)]
    assert [type(r) for r in filled[:4]] == [int, float, int, float]
    assert counted == list(range(-25000, 25000))


class ClaimsInt:
    """Says it is an int, as a mock or a proxy may: taken at its word, marshal would refuse it;
    pickle, which builds it by its real class, does."""
    @property
    def __class__(self):
        return int


class UnhashableMeta(type):
    __eq__ = type.__eq__  # and so no __hash__: `cls in a_set` raises TypeError
    __hash__ = None


class OfUnhashableClass(metaclass=UnhashableMeta):
    pass


def odd_result_at(i, at, kind):
    if i != at:
        return i * 3
    return ClaimsInt() if kind == "claims-int" else OfUnhashableClass()


@pytest.mark.parametrize("kind", ["claims-int", "unhashable-class"])
def test_tiny_tasks_an_odd_result_fails_its_task_not_its_worker(pool, kind):
    # A result whose class lies, or whose class can't be hashed (the worker's type test raises),
    # is its task's error, like a result that can't be pickled: the worker goes on, and no other
    # task fails.
    with _fault_deadline(90, "map"):
        res = pool.map(functools.partial(odd_result_at, at=500, kind=kind), range(2000))
    assert isinstance(res[500], str) and "odd_result_at" in res[500] and "ChildProcessError" not in res[500], res[500]
    assert [r for i, r in enumerate(res) if i != 500] == [i * 3 for i in range(2000) if i != 500]


@pytest.mark.parametrize("iterables", [1, 2])
def test_executor_map_of_one_iterable_calls_with_each_item(spex, iterables):
    # One iterable: fn(x) for each x, tuples included (a tuple is not spread into arguments).
    items = [(1, 2), (3,), "ab", 5]
    with _fault_deadline(60, "map"):
        if iterables == 1:
            assert list(spex.map(same, items)) == items
        else:
            assert list(spex.map(echo, items, range(4))) == [((x, i), {}) for i, x in enumerate(items)]


# ---------------------------------------------------------------------------------------------
# mplite.ProcessPoolExecutor.map(buffersize=)
# ---------------------------------------------------------------------------------------------

def test_executor_map_buffersize_bounds_what_is_submitted_ahead(spex):
    for n in (1, 3, 8):
        source = Counting(10_000)
        with _fault_deadline(60, "map"):
            it = spex.map(double, source, buffersize=n)
            assert source.yielded <= n
            for k in range(1, 40):
                assert next(it) == 2 * (k - 1)
                assert source.yielded <= k + n, "buffersize=%d: %d taken, %d read" % (n, k, source.yielded)
            it.close()
        assert source.yielded <= 39 + n


def test_executor_map_buffersize_results_in_order_and_to_the_end(spex):
    with _fault_deadline(60, "map"):
        assert list(spex.map(jitter, range(50), buffersize=4)) == [x * 10 for x in range(50)]
        assert list(spex.map(adder, range(10), range(100, 110), buffersize=3)) == \
            [a + b for a, b in zip(range(10), range(100, 110))]
        assert list(spex.map(double, itertools.islice(itertools.count(), 7), buffersize=100)) == \
            [0, 2, 4, 6, 8, 10, 12]
        assert list(spex.map(double, [], buffersize=2)) == []
        results = spex.map(raise_on, [1, 2, 3], [2, 2, 2], buffersize=1)
        assert next(results) == 1
        with pytest.raises(KeyError):
            next(results)


def test_executor_map_buffersize_of_an_infinite_input(spex):
    with _fault_deadline(60, "map"):
        it = spex.map(double, itertools.count(), buffersize=4)
        assert list(itertools.islice(it, 20)) == [2 * i for i in range(20)]
        it.close()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_executor_map_buffersize_validation(spex, value, error):
    source = Counting(10)
    with pytest.raises(error):
        spex.map(double, source, buffersize=value)
    assert source.yielded == 0


def test_executor_map_closed_early_cancels_the_rest(tmp_path):
    log = str(tmp_path / "log.txt")
    for buffersize in (None, 5):
        with mplite.ProcessPoolExecutor(1, mp_context="spawn") as ex:
            with _fault_deadline(60, "map"):
                it = ex.map(logged_sleep, range(30), [log] * 30, [0.1] * 30, buffersize=buffersize)
                assert [next(it), next(it)] == [0, 1]
                it.close()
                # one worker runs its work in order: what was not cancelled has run once this is done
                assert ex.submit(adder, 2, 2).result(timeout=60) == 4
        ran = runs(log)
        assert max(ran.values()) == 1
        assert len(ran) < 10, "buffersize=%s: %d of 30 ran after the map was closed" % (buffersize, len(ran))
        os.remove(log)


def test_executor_map_closed_early_cancels_the_rest_after_tiny_tasks(tmp_path):
    # The same, on an executor that has just run a tiny task: the engine's batching must not make
    # the rest of a map of longer tasks (sent to the worker in one message) impossible to cancel.
    log = str(tmp_path / "log.txt")
    with mplite.ProcessPoolExecutor(1, mp_context="spawn") as ex:
        with _fault_deadline(60, "map"):
            assert ex.submit(adder, 1, 1).result(timeout=60) == 2
            it = ex.map(logged_sleep, range(30), [log] * 30, [0.1] * 30)
            assert [next(it), next(it)] == [0, 1]
            it.close()
            assert ex.submit(adder, 2, 2).result(timeout=60) == 4
    ran = runs(log)
    assert max(ran.values()) == 1
    assert len(ran) < 10, "%d of 30 ran after the map was closed" % len(ran)


# =============================================================================================
# Issue 10: TaskManager(executor=...): the stdlib's executors, mplite's, and dask's
# =============================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# Task functions (module level)
# ---------------------------------------------------------------------------------------------

def echo_kwargs(**kwargs):
    return kwargs


def counter_task(path):
    """A side effect per call: one line appended (one O_APPEND write)."""
    _fault_append(path, "ran %d" % os.getpid())
    return "counted"




def tiny(i):
    return i * 3




def get_pid():
    return os.getpid()


# ---------------------------------------------------------------------------------------------
# Fixtures: the user's executors, shared by this module's tests and shut down at its end
# ---------------------------------------------------------------------------------------------

KINDS = ["thread", "stdlib-process", "mplite-process"]


def make_user_executor(kind, n=2):
    if kind == "thread":
        return concurrent.futures.ThreadPoolExecutor(n)
    if kind == "stdlib-process":
        return concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
    if kind == "mplite-process":
        return mplite.ProcessPoolExecutor(n, mp_context="spawn")
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def user_executors(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            ex = cache[kind] = make_user_executor(kind)
            if kind != "thread":  # both workers up, this module imported there: not in a task's timeout
                folder = tempfile.mkdtemp(dir=str(tmp_path_factory.getbasetemp()))
                with _fault_deadline(60, "starting the user's executor"):
                    assert len(set(ex.map(rendezvous, [folder] * 2, [2] * 2, timeout=60))) == 2
        return cache[kind]

    yield get
    with _fault_deadline(60, "shutting down the user's executors"):
        for ex in cache.values():
            ex.shutdown(wait=True)  # nothing is left to cancel (and 3.8's has no cancel_futures)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def uex(user_executors, kind):
    """One of the user's executors (2 workers), for each kind."""
    return user_executors(kind)


def assert_executor_still_works(ex):
    assert ex.submit(adder, 20, 22).result(timeout=60) == 42


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [42, "executor", concurrent.futures.ThreadPoolExecutor])
def test_executor_that_is_not_an_executor_is_a_type_error(value):
    with pytest.raises(TypeError):
        TaskManager(executor=value)


def test_executor_with_worker_init_or_max_tasks_per_child_is_a_value_error(user_executors):
    ex = user_executors("thread")
    with pytest.raises(ValueError):
        TaskManager(executor=ex, worker_init=Task(adder, 1, 2))
    with pytest.raises(ValueError):
        TaskManager(executor=ex, max_tasks_per_child=3)
    assert_executor_still_works(ex)


def test_import_mplite_does_not_import_dask(tmp_path):
    code = "import mplite, sys; print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.decode().strip() == "False"


# ---------------------------------------------------------------------------------------------
# The TaskManager API on the user's executor
# ---------------------------------------------------------------------------------------------

def test_execute_map_imap_results_in_order(uex):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(jitter, x) for x in range(40)], progress=False) == [x * 10 for x in range(40)]
            assert tm.execute([], progress=False) == []
            assert tm.execute([Task(echo, 1, b=2)], progress=False) == [((1,), {"b": 2})]
            assert tm.map(jitter, range(20)) == [x * 10 for x in range(20)]
            assert list(tm.imap(jitter, iter(range(20)))) == [x * 10 for x in range(20)]
            assert tm.execute([Task(lambda x: x + 1, 1)], progress=False) == [2]
    assert_executor_still_works(uex)


def meet_where(folder, n=0, limit=10.0):
    """Arrive in `folder` as this process and thread, then wait (up to `limit` s) until n have: which."""
    me = "%d-%d" % (os.getpid(), threading.get_ident())
    open(os.path.join(folder, me), "w").close()
    deadline = time.monotonic() + limit
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return me


def test_calls_of_a_tiny_function_spread_over_the_executors_free_slots(uex, tmp_path):
    # As on mplite's own workers (test_sched_calls_of_a_tiny_function_spread_over_free_workers):
    # meet_where measured as tiny, two of its calls that wait for each other go one to each of
    # the executor's 2 slots; in one batch, the first gives up after 10 s and both report one place.
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(120, "execute"):
            for round_ in range(3):  # measured as tiny again each round: a meeting takes its time
                tiny_dir = str(tmp_path / ("tiny-%d" % round_))
                os.mkdir(tiny_dir)
                assert len(tm.map(meet_where, [tiny_dir] * 2000)) == 2000
                folder = str(tmp_path / ("meet-%d" % round_))
                os.mkdir(folder)
                places = tm.execute([Task(meet_where, folder, 2)] * 2, progress=False)
                assert len(set(places)) == 2, "round %d: both calls ran at %s" % (round_, places)
    assert_executor_still_works(uex)


def test_tasks_run_on_the_users_executor(user_executors):
    ex = user_executors("stdlib-process")
    with TaskManager(executor=ex) as tm:
        with _fault_deadline(60, "execute"):
            pids = set(tm.execute([Task(get_pid) for _ in range(20)], progress=False))
    pool_pids = set(ex._processes)  # the stdlib executor's own workers
    assert pids and pids <= pool_pids and os.getpid() not in pids
    ex = user_executors("thread")
    with TaskManager(executor=ex) as tm:
        with _fault_deadline(60, "execute"):
            assert set(tm.execute([Task(get_pid) for _ in range(5)], progress=False)) == {os.getpid()}


def test_progress_on_the_users_executor(uex, capfd):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "execute"):
            bar = RecordingBar()
            assert tm.execute([Task(adder, i, i) for i in range(7)], pbar=bar) == [2 * i for i in range(7)]
            assert bar.n == 7 and bar.closed is False
            assert capfd.readouterr().err == ""
            assert tm.execute([Task(adder, i, i) for i in range(20)]) == [2 * i for i in range(20)]
    err = capfd.readouterr().err
    assert FINAL_BAR.search(err), repr(err)


def test_submit_take_as_completed_open_tasks(uex):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "submit/take"):
            assert tm.take() is None
            ids = [tm.submit(Task(adder, i, 100)) for i in range(6)]
            assert len(set(ids)) == 6
            assert tm.open_tasks == 6
            got = [tm.take(timeout=None) for _ in range(3)]
            assert tm.open_tasks == 3
            pairs = list(tm.as_completed(timeout=60))
            assert tm.open_tasks == 0
            assert sorted(got + [r for _, r in pairs]) == [100 + i for i in range(6)]
            assert {t.id for t, _ in pairs} <= set(ids)
            assert tm.take(timeout=None) is None  # nothing open: returns at once


def test_task_chains(uex):
    with TaskManager(executor=uex) as tm:
        tasks = [Task(adder, 1, 1), TaskChain(Task(double, 3), double_until_100),
                 TaskChain(Task(adder, 1, 2), then_double), TaskChain(Task(adder, 1, 2), to_subchain),
                 TaskChain(Task(adder, 5, 5))]
        with _fault_deadline(60, "execute"):
            assert tm.execute(tasks, progress=False) == [2, 192, 6, 12, 10]
            chain = TaskChain(Task(double, 3), double_until_100)
            assert tm.submit(chain) == chain.id
            assert tm.take(timeout=60) == 192


def test_str_mode_failure_is_the_traceback_text(uex):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "execute"):
            res = tm.execute([Task(adder, 1, 1), Task(broken, 1), Task(adder, 2, 2)], progress=False)
    assert res[0] == 2 and res[2] == 4
    assert _fault_check_error_str(res[1], ", in broken", 'raise NotImplementedError("this task must fail!")') \
        == "NotImplementedError: this task must fail!"


def test_exception_mode_raises_the_tasks_exception(uex):
    with TaskManager(executor=uex, error_mode="exception") as tm:
        with _fault_deadline(60, "execute"):
            with pytest.raises(NotImplementedError, match="this task must fail!"):
                tm.execute([Task(adder, 1, 1), Task(broken, 1), Task(adder, 2, 2)], progress=False)
            with pytest.raises(NotImplementedError):
                tm.map(broken, [1])
            tm.submit(Task(broken))
            with pytest.raises(NotImplementedError):
                tm.take(timeout=None)
            assert tm.open_tasks == 0
            assert tm.execute([Task(adder, i, i) for i in range(5)], progress=False) == [0, 2, 4, 6, 8]


def test_timeout_fails_only_the_slow_task(uex):
    tasks = [Task(sleep_return, 3, "slow")] + [Task(adder, i, 1) for i in range(200)]
    with TaskManager(executor=uex, timeout=1.0) as tm:
        with _fault_deadline(60, "execute"):
            res = tm.execute(tasks, progress=False)
    assert _fault_check_error_str(res[0]).startswith("TimeoutError"), res[0]
    assert res[1:] == list(range(1, 201))


def test_timeout_per_call_in_exception_mode(uex):
    with TaskManager(executor=uex, error_mode="exception") as tm:
        with _fault_deadline(60, "execute"):
            with pytest.raises(TimeoutError):
                tm.execute([Task(adder, 1, 1), Task(sleep_return, 3, "slow")], progress=False, timeout=1.0)
            assert tm.execute([Task(adder, i, 1) for i in range(10)], progress=False) == list(range(1, 11))


@pytest.mark.parametrize("kind", ["thread", "stdlib-process"])
def test_many_tiny_tasks_are_batched(uex):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(90, "20000 tiny tasks"):
            assert tm.execute([Task(tiny, i) for i in range(20_000)], progress=False) == \
                [i * 3 for i in range(20_000)]
            assert tm.map(tiny, range(20_000)) == [i * 3 for i in range(20_000)]


def test_identical_tasks_are_never_merged(uex, tmp_path):
    path = str(tmp_path / "count.txt")
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(counter_task, path)] * 5, progress=False) == ["counted"] * 5
            assert len(_fault_lines(path)) == 5
            assert tm.execute([Task(counter_task, path) for _ in range(5)], progress=False) == ["counted"] * 5
            assert len(_fault_lines(path)) == 10
            task = Task(counter_task, path)
            tm.submit(task)
            tm.submit(task)
            assert [tm.take(timeout=None), tm.take(timeout=None)] == ["counted"] * 2
    assert len(_fault_lines(path)) == 12


DASK_NAMED_KWARGS = dict(key=1, pure=2, workers=3, priority=4, retries=5, resources=6, allow_other_workers=7,
                         fifo_timeout=8, actor=9, actors=10)


def test_keyword_arguments_named_like_dasks_reach_the_task(uex):
    with TaskManager(executor=uex) as tm:
        with _fault_deadline(60, "execute"):
            assert tm.execute([Task(echo_kwargs, key=1, pure=2)], progress=False) == [{"key": 1, "pure": 2}]
            assert tm.execute([Task(echo_kwargs, **DASK_NAMED_KWARGS)], progress=False) == [DASK_NAMED_KWARGS]
            tm.submit(Task(echo_kwargs, workers=["a"], priority=-1))
            assert tm.take(timeout=None) == {"workers": ["a"], "priority": -1}


def test_threads_get_their_own_results(uex):
    with TaskManager(executor=uex) as tm:
        def caller(tid):
            for r in range(5):
                base = tid * 1_000_000 + r * 1000
                got = tm.execute([Task(adder, base, i) for i in range(100)], progress=False)
                assert got == [base + i for i in range(100)], "thread %d, call %d got others' results" % (tid, r)
                assert list(tm.imap(functools.partial(adder, base), range(50))) == [base + i for i in range(50)]

        run_threads([functools.partial(caller, tid) for tid in range(2)])
        assert tm.open_tasks == 0


def test_stop_does_not_shut_down_the_users_executor(uex):
    tm = TaskManager(executor=uex)
    tm.start()
    assert tm.execute([Task(adder, 1, 2)], progress=False) == [3]
    tm.stop()
    tm.stop()
    assert_executor_still_works(uex)
    with pytest.raises(RuntimeError):
        tm.execute([Task(adder, 1, 2)], progress=False)
    with TaskManager(executor=uex, error_mode="exception") as tm:
        with pytest.raises(NotImplementedError):
            tm.execute([Task(broken)], progress=False)
    assert_executor_still_works(uex)


# ---------------------------------------------------------------------------------------------
# A task that kills its worker
# ---------------------------------------------------------------------------------------------

def test_worker_killed_on_mplite_executor_fails_only_its_task(tmp_path):
    log = str(tmp_path / "log.txt")
    n, die_at = 50, 23
    with mplite.ProcessPoolExecutor(2, mp_context="spawn") as ex:
        with TaskManager(executor=ex) as tm:
            with _fault_deadline(90, "execute"):
                res = tm.execute([Task(logged, i, log, die_at) for i in range(n)], progress=False)
            _fault_check_error_str(res[die_at], "logged")
            assert res[:die_at] + res[die_at + 1:] == [i * 3 for i in range(n) if i != die_at]
            # every task ran; on an executor, the tasks of a submission that died run again one by
            # one to find the culprit (documented), so some, the culprit too, may run twice
            assert set(int(x) for x in _fault_lines(log)) == set(range(n))
            with _fault_deadline(60, "execute after the death"):
                assert tm.execute([Task(adder, i, 1) for i in range(20)], progress=False) == list(range(1, 21))
        assert_executor_still_works(ex)


def test_worker_killed_on_stdlib_executor_raises_promptly(tmp_path):
    log = str(tmp_path / "log.txt")
    ex = make_user_executor("stdlib-process")
    try:
        with TaskManager(executor=ex) as tm:
            with _fault_deadline(60, "execute on a broken stdlib executor"):
                with pytest.raises((BrokenProcessPool, RuntimeError)):
                    tm.execute([Task(logged, i, log, 7) for i in range(30)], progress=False)
                with pytest.raises((BrokenProcessPool, RuntimeError)):
                    tm.execute([Task(adder, 1, 1)], progress=False)
    finally:
        with _fault_deadline(60, "shutdown"):
            ex.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# Import probe: the workers can't import the task's module
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Review regressions: the executor path
# ---------------------------------------------------------------------------------------------

def test_timed_task_queued_behind_untimed_ones_still_times_out():
    # Batches of untimed tasks must not swallow a task with a timeout: it travels alone.
    with concurrent.futures.ThreadPoolExecutor(1) as ex, TaskManager(cpu_count=1, executor=ex) as tm:
        for i in range(3):
            tm.submit(Task(adder, i, 1))
        slow = tm.submit(Task(sleep_return, 1.5, "late"), timeout=0.2)
        for i in range(10):
            tm.submit(Task(adder, i, 1))
        with _fault_deadline(60, "as_completed"):
            got = {task.id: result for task, result in tm.as_completed(timeout=50)}
    assert len(got) == 14
    assert _fault_check_error_str(got[slow]).startswith("TimeoutError"), got[slow]


class _Liar(concurrent.futures.Executor):
    """An executor whose futures hold something else than what was called returns."""

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result("nonsense")
        return future


class _Picky(concurrent.futures.ThreadPoolExecutor):
    """An executor that refuses, in submit() itself, any call that carries a 1313."""

    def submit(self, fn, *args, **kwargs):
        if "1313" in repr(args):
            raise ValueError("1313 can't travel here")
        return super().submit(fn, *args, **kwargs)


def test_an_executor_that_returns_nonsense_fails_the_tasks_not_the_caller():
    with TaskManager(cpu_count=1, executor=_Liar()) as tm, _fault_deadline(60, "execute"):
        results = tm.execute([Task(adder, 1, 2), Task(adder, 3, 4)], progress=False)
    for result in results:
        assert "WorkerDiedError" in _fault_check_error_str(result) and "nonsense" in result, result


def test_an_executor_that_refuses_one_batch_in_submit_fails_only_that_task():
    items = list(range(20))
    items[13] = 1313
    with _Picky(2) as ex, TaskManager(executor=ex) as tm, _fault_deadline(60, "map"):
        results = tm.map(double, items)
        assert tm.map(double, range(3)) == [0, 2, 4]  # the manager goes on
    assert "1313 can't travel here" in _fault_check_error_str(results[13]), results[13]
    assert [r for i, r in enumerate(results) if i != 13] == [2 * i for i in range(20) if i != 13]


def test_a_function_of_a_namespace_no_worker_imports_runs_by_value(tmp_path):
    # Made by exec (as runpy.run_path does): no module of that name exists, and none is needed.
    namespace = {"__name__": "made_at_run_time"}
    exec("def triple(x):\n    return 3 * x\n", namespace)
    with concurrent.futures.ThreadPoolExecutor(2) as ex, TaskManager(executor=ex) as tm:
        with _fault_deadline(60, "map"):
            assert tm.map(namespace["triple"], range(4)) == [0, 3, 6, 9]


def test_a_vendored_copy_of_mplite_probes_its_own_name():
    spec = importlib.util.spec_from_file_location("vendored_mplite", mplite.__file__)
    vendored = importlib.util.module_from_spec(spec)
    sys.modules["vendored_mplite"] = vendored
    try:
        spec.loader.exec_module(vendored)
        with concurrent.futures.ThreadPoolExecutor(2) as ex, vendored.TaskManager(executor=ex) as tm:
            with _fault_deadline(60, "execute"):
                assert tm.execute([vendored.Task(adder, 1, 2)], progress=False) == [3]
    finally:
        del sys.modules["vendored_mplite"]


def test_executor_map_refuses_more_calls_after_shutdown():
    ex = mplite.ProcessPoolExecutor(1, mp_context="spawn")
    try:
        with _fault_deadline(60, "map"):
            it = ex.map(double, itertools.count(), buffersize=2)
            assert [next(it), next(it)] == [0, 2]
            ex.shutdown(wait=False)
            with pytest.raises(RuntimeError, match="after shutdown"):
                for _ in range(1000):
                    next(it)
    finally:
        ex.shutdown(wait=True)


def test_imap_an_argument_that_cant_travel_is_that_items_error(pools):
    items = list(range(30))
    items[17] = threading.Lock()
    with _fault_deadline(60, "imap"):
        results = list(pools.get("spawn").imap(type_name, items))
    assert [r for i, r in enumerate(results) if i != 17] == ["int"] * 29
    assert "UnpicklableTaskError" in _fault_check_error_str(results[17]), results[17]
    with _fault_deadline(60, "imap"):
        it = pools.get("spawn", "exception").imap(type_name, items)
        assert list(itertools.islice(it, 17)) == ["int"] * 17
        with pytest.raises(mplite.UnpicklableTaskError):
            next(it)


def test_a_task_keeps_its_id_and_attributes_when_copied_or_pickled():
    import copy
    task = Task(adder, 1, b=2)
    task.note = "mine"
    for other in (copy.copy(task), pickle.loads(pickle.dumps(task))):
        assert (other.id, other.note, other.f, other.args, other.kwargs) == (task.id, "mine", adder, (1,), {"b": 2})
    fresh = pickle.loads(pickle.dumps(Task(adder, 3, 1)))
    assert fresh.execute() == 4 and fresh.id != task.id


def type_name(x):
    return type(x).__name__


def test_executor_lambda_with_an_argument_that_cant_travel_is_that_tasks_error():
    lock = threading.Lock()
    tasks = [Task(lambda x, y=None: x * 2, i) for i in range(6)]
    tasks[4] = Task(lambda x, y=None: x * 2, 4, y=lock)  # by value: mplite pickles it, and can't
    with concurrent.futures.ThreadPoolExecutor(2) as ex, TaskManager(executor=ex) as tm:
        with _fault_deadline(60, "submit and take"):
            ids = [tm.submit(task) for task in tasks]
            got = {task.id: result for task, result in tm.as_completed(timeout=50)}
        assert [got[i] for i in ids[:4]] == [0, 2, 4, 6] and got[ids[5]] == 10
        assert "UnpicklableTaskError" in _fault_check_error_str(got[ids[4]]), got[ids[4]]
        with _fault_deadline(60, "execute"), pytest.raises(mplite.UnpicklableTaskError):
            tm.execute(tasks, progress=False)


def assert_probe_refuses(ex, module, name, seconds):
    """execute() of a task from a module ex's workers can't import raises ImportError naming
    it, and the manager goes on."""
    with TaskManager(executor=ex) as tm:
        with _fault_deadline(seconds, "execute of a task the workers can't import"):
            with pytest.raises(ImportError) as excinfo:
                tm.execute([Task(module.fn, 1)], progress=False)
            assert name in str(excinfo.value)
            assert tm.execute([Task(adder, 2, 2)], progress=False) == [4]


def write_module_after_start(tmp_path, name):
    """A module the already-started workers can't import: only the parent's sys.path has its folder."""
    folder = tmp_path / "late"
    folder.mkdir()
    (folder / (name + ".py")).write_text("def fn(x):\n    return x + 1\n")
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module(name), str(folder)


def forget_module(name, folder):
    sys.modules.pop(name, None)
    if folder in sys.path:
        sys.path.remove(folder)


def test_import_probe_names_the_module_the_workers_cant_import(tmp_path):
    name = "wip_late_module_%d" % os.getpid()
    ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    folder = None
    try:
        assert ex.submit(adder, 1, 1).result(timeout=60) == 2  # its worker is up: sys.path fixed
        module, folder = write_module_after_start(tmp_path, name)
        assert module.fn(1) == 2
        assert_probe_refuses(ex, module, name, 60)
    finally:
        if folder:
            forget_module(name, folder)
        with _fault_deadline(60, "shutdown"):
            ex.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# dask.distributed: client.get_executor()
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    old_pythonpath = os.environ.get("PYTHONPATH")
    # the workers import this module (and test_mplite, mplite) by name
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE] + ([old_pythonpath] if old_pythonpath else []))
    with _fault_deadline(90, "starting a dask LocalCluster"):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        yield client
    finally:
        with _fault_deadline(90, "closing the dask LocalCluster"):
            client.close()
            cluster.close()
        if old_pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_pythonpath


@pytest.fixture
def dex(dask_client):
    return dask_client.get_executor()


def test_dask_execute_and_map_results_in_order(dex):
    assert isinstance(dex, concurrent.futures.Executor)
    with TaskManager(executor=dex) as tm:
        with _fault_deadline(90, "execute on dask"):
            assert tm.execute([Task(jitter, x) for x in range(30)], progress=False) == [x * 10 for x in range(30)]
            assert tm.map(jitter, range(10)) == [x * 10 for x in range(10)]
            assert list(tm.imap(jitter, range(10))) == [x * 10 for x in range(10)]
            assert tm.execute([Task(tiny, i) for i in range(5000)], progress=False) == [i * 3 for i in range(5000)]
            assert tm.execute([Task(echo_kwargs, **DASK_NAMED_KWARGS)], progress=False) == [DASK_NAMED_KWARGS]
            pids = set(tm.execute([Task(get_pid) for _ in range(10)], progress=False))
            assert os.getpid() not in pids


def test_dask_errors_in_both_modes(dex):
    with TaskManager(executor=dex) as tm:
        with _fault_deadline(90, "execute on dask"):
            res = tm.execute([Task(adder, 1, 1), Task(broken, 1), Task(adder, 2, 2)], progress=False)
    assert res[0] == 2 and res[2] == 4
    assert _fault_check_error_str(res[1], ", in broken") == "NotImplementedError: this task must fail!"
    with TaskManager(executor=dex, error_mode="exception") as tm:
        with _fault_deadline(90, "execute on dask"):
            with pytest.raises(NotImplementedError, match="this task must fail!"):
                tm.execute([Task(adder, 1, 1), Task(broken, 1)], progress=False)
            assert tm.execute([Task(adder, 1, 1)], progress=False) == [2]


def test_dask_identical_tasks_are_never_merged(dex, tmp_path):
    path = str(tmp_path / "count.txt")
    with TaskManager(executor=dex) as tm:
        with _fault_deadline(90, "execute on dask"):
            assert tm.execute([Task(counter_task, path)] * 5, progress=False) == ["counted"] * 5
            assert len(_fault_lines(path)) == 5
            assert tm.execute([Task(counter_task, path)] * 3, progress=False) == ["counted"] * 3  # again: not cached
            assert len(_fault_lines(path)) == 8
            tm.submit(Task(counter_task, path))
            tm.submit(Task(counter_task, path))
            assert [tm.take(timeout=None), tm.take(timeout=None)] == ["counted"] * 2
    assert len(_fault_lines(path)) == 10


def test_dask_progress_and_submit_take(dex):
    with TaskManager(executor=dex) as tm:
        with _fault_deadline(90, "dask"):
            bar = RecordingBar()
            assert tm.execute([Task(adder, i, i) for i in range(9)], pbar=bar) == [2 * i for i in range(9)]
            assert bar.n == 9 and not bar.closed
            for i in range(4):
                tm.submit(Task(adder, i, 10))
            assert tm.open_tasks == 4
            got = sorted(tm.take(timeout=None) for _ in range(4))
            assert got == [10, 11, 12, 13] and tm.open_tasks == 0
            assert tm.take() is None


def test_dask_import_probe(dex, tmp_path):
    name = "wip_late_dask_module_%d" % os.getpid()
    module, folder = write_module_after_start(tmp_path, name)
    try:
        assert_probe_refuses(dex, module, name, 90)
    finally:
        forget_module(name, folder)


def test_dask_a_task_killing_its_worker(dex, tmp_path):
    # dask retries the task whose worker died (allowed-failures), restarting a worker each time
    log = str(tmp_path / "log.txt")
    n, die_at = 20, 11
    with TaskManager(executor=dex) as tm:
        with _fault_deadline(110, "execute on dask with a killed worker"):
            res = tm.execute([Task(logged, i, log, die_at) for i in range(n)], progress=False)
        errors = [i for i, r in enumerate(res) if r != i * 3]
        assert errors == [die_at], res
        assert isinstance(res[die_at], str) and res[die_at].startswith("Traceback"), res[die_at]
        assert set(int(x) for x in _fault_lines(log)) == set(range(n))
        with _fault_deadline(90, "execute on dask after the death"):
            assert tm.execute([Task(adder, i, 1) for i in range(10)], progress=False) == list(range(1, 11))


# =============================================================================================
# Issue 16: conformance with CPython's own ProcessPoolExecutor tests
#
# Ported (rewritten, not copied) from CPython's Lib/test/test_concurrent_futures/: executor.py,
# test_process_pool.py, test_shutdown.py, test_wait.py, test_as_completed.py, test_init.py and
# test_deadlock.py. Each test here says which CPython test it comes from. "As-is": the same calls
# and the same assertions; only the harness differs (2 workers instead of 5, files as gates in
# place of sleeps and Manager events, deadlines on anything that could hang, each start method
# even where CPython skips fork). "Adapted": where mplite is better on purpose (a dead worker
# fails only its own future, max_tasks_per_child under fork, a dropped executor finishes its
# work) or where CPython looks at internals, the test asks for mplite's documented behaviour
# (README, "Coming from concurrent.futures") and says so.
#
# The five behaviours of the issue, with the lead's decisions for them:
#   1. map() lets go of each result once it has yielded it ......... test_cf_free_reference
#   2. "running" = assigned to a worker, at most one message per worker before it is ready, so
#      shutdown(cancel_futures=True) just after 50 submits cancels most, lets one finish
#                                                                   test_cf_cancel_futures
#   3. shutdown(wait=True) never hangs after a cancelled future ...... test_cf_hang_gh94440
#   4. an executor dropped unshut shuts down when collected, and a map() made before still
#      yields every result ............................................ test_cf_del_shutdown
#   5. a result whose pickling raises fails its future with that very exception, mplite's
#      explanation in its __cause__ ... test_cf_result_pickling_error_is_the_error_raised and
#      test_cf_deadlock[error_during_result_pickle_on_worker / exit_during_result_pickle_on_worker]
#
# Left out, each for its reason:
#   test_process_pool.py:
#     test_max_workers_too_large ............ Windows only (61-handle limit)
#     test_sysconf_permission_error ......... mocks os.sysconf for the stdlib's own check
#     test_saturation ....................... counts executor._processes
#     test_idle_process_reuse_one/_multiple . count executor._processes; mplite starts every
#                                             worker at once on purpose (README)
#     test_force_shutdown_during_max_tasks_worker_exit  sets executor._force_shutting_down
#     test_failed_worker_replacement_breaks_pool ...... mocks process._spawn_worker
#     test_python_finalization_error ........ mocks threading._start_joinable_thread
#     test_terminate_workers, test_kill_workers, test_force_shutdown_workers_invalid_op
#                                             mock / call executor._force_shutdown
#     test_force_shutdown_workers (x2) ...... mocks Process.terminate/kill of executor._processes
#     test_force_shutdown_workers_not_started_yet  mocks mp_context.Process
#     test_force_shutdown_workers_dead_workers, test_force_shutdown_workers_stops_pool
#                                             terminate_workers()/kill_workers() (3.14 API,
#                                             which mplite does not have) and executor._processes
#   test_deadlock.py:
#     test_gh105829_should_not_deadlock_if_wakeup_pipe_full  mocks _ExecutorManagerThread.run
#                                             and process._ThreadWakeup
#   test_as_completed.py:
#     test_free_reference_yielded_future, test_correct_timeout_exception_msg: as_completed() over
#     Futures built by hand (Future._state set directly); no executor is involved
#   executor.py (newer CPython): map() going on after a failed item (test_map_exception's and
#   test_map_timeout_from_callable's later next() calls): older CPythons (3.11 here) stop
#   there, as mplite does; the parts every version shares are ported.
#   Not checked within an adapted test: FailingInitializerMixin's log record (the stdlib logs
#   the initializer's error to the "concurrent.futures" logger; mplite puts its traceback in the
#   BrokenProcessPool's message instead, README), which test_cf_failing_initializer checks.
#   Thread-pool-only tests (test_cancel_futures_wait_false, test_pending_calls_race,
#   test_threads_terminate, ...) are not about process pools and are not counted.
# =============================================================================================

import io
import operator
from concurrent.futures import BrokenExecutor


# ---------------------------------------------------------------------------------------------
# Task functions and helper classes (module level: workers find them by name)
# ---------------------------------------------------------------------------------------------

def cf_mul(x, y):
    return x * y


def cf_capture(*args, **kwargs):
    return args, kwargs


class cf_Object:
    """CPython's MyObject: its collection shows that nothing holds it any more."""

    def my_method(self):
        return None


def cf_make_object(_):
    return cf_Object()


def cf_raiser(exc_type, msg):
    raise exc_type(msg)


class cf_FalseyBoolError(Exception):
    def __bool__(self):
        return False


class cf_FalseyLenError(Exception):
    def __len__(self):
        return 0


def cf_timeout_on_one(x):
    if x == 1:
        raise TimeoutError  # the builtin: the task's own error, not map()'s timeout
    return x


def cf_traceback_task():
    raise RuntimeError(123)  # cf marker comment


CF_INIT_STATUS = "uninitialized"


def cf_init(x):
    global CF_INIT_STATUS
    CF_INIT_STATUS = x


def cf_get_init_status():
    return CF_INIT_STATUS


def cf_init_fail():
    time.sleep(0.1)  # let some futures be queued first
    raise ValueError("error in initializer")


def cf_wait_and_raise(gate):
    wait_for_file(gate, None)
    raise Exception("this is an exception")


def cf_exit():
    sys.exit(1)


def cf_crash(delay=None):
    """A segfault in the worker (after `delay` seconds)."""
    if delay:
        time.sleep(delay)
    _fault_die("SIGSEGV")


def cf_crash_with_data(data):
    cf_crash()


def cf_raise_error(exc_type):
    raise exc_type()


def cf_raise_unpickling():
    raise pickle.UnpicklingError("error while rebuilding")


def cf_return_instance(cls):
    return cls()


class cf_CrashAtPickle:
    def __reduce__(self):
        cf_crash()


class cf_CrashAtUnpickle:
    def __reduce__(self):
        return cf_crash, ()


class cf_ExitAtPickle:
    def __reduce__(self):
        sys.exit(1)


class cf_ExitAtUnpickle:
    def __reduce__(self):
        return cf_exit, ()


class cf_ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("Error in pickle")


class cf_ErrorAtUnpickle:
    def __reduce__(self):
        return cf_raise_unpickling, ()


def cf_good_task(n):
    time.sleep(0.1 * n)
    return n


def cf_failing_task(n):
    raise ValueError("failing task")


def cf_worker_cmdline():
    return _cmdline(os.getpid())


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------

def cf_future(state, value=None):
    """A Future in a given state, made through its public API (CPython sets Future._state)."""
    future = concurrent.futures.Future()
    if state == "running":
        future.set_running_or_notify_cancel()
    elif state == "cancelled":
        future.cancel()
    elif state == "cancelled_and_notified":
        future.cancel()
        assert future.set_running_or_notify_cancel() is False
    elif state == "exception":
        future.set_exception(value if value is not None else OSError())
    elif state == "successful":
        future.set_result(42 if value is None else value)
    else:
        assert state == "pending", state
    return future


def cf_run_script(tmp_path, source, *args, limit=120):
    """Run `source` as a script file (in its own session, as run_script_in_own_session does)."""
    script = tmp_path / "cf_script.py"
    script.write_text(textwrap.dedent(source))
    return run_script_in_own_session([str(script)] + [str(a) for a in args], limit=limit)


def cf_shutdown(ex, **kwargs):
    """shutdown() under a deadline: a hang is a failure."""
    bounded(lambda: ex.shutdown(**kwargs), 60)


@pytest.fixture
def cf_ex(executors, method):
    """The shared running 2-worker executor of this start method (see Executors)."""
    return executors.get(method)


# ---------------------------------------------------------------------------------------------
# executor.py (ExecutorTest)
# ---------------------------------------------------------------------------------------------

def test_cf_submit(cf_ex):
    # as-is
    assert cf_ex.submit(pow, 2, 8).result(timeout=60) == 256


def test_cf_submit_keyword(cf_ex):
    # as-is: fn is positional-only, so "self" and "fn" are the task's own keywords
    assert cf_ex.submit(cf_mul, 2, y=8).result(timeout=60) == 16
    assert cf_ex.submit(cf_capture, 1, self=2, fn=3).result(timeout=60) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        cf_ex.submit(fn=cf_capture, arg=1)
    with pytest.raises(TypeError):
        cf_ex.submit(arg=1)


def test_cf_map(cf_ex):
    # as-is
    expected = list(map(pow, range(10), range(10)))
    assert list(cf_ex.map(pow, range(10), range(10), timeout=60)) == expected
    assert list(cf_ex.map(pow, range(10), range(10), chunksize=3, timeout=60)) == expected


def test_cf_map_exception(cf_ex):
    # as-is (the part every CPython version shares: what a newer one yields after the failed
    # item is left out, see the banner)
    results = cf_ex.map(divmod, [5, 5, 5, 5], [2, 3, 0, 5], timeout=60)
    assert next(results) == (2, 1)
    assert next(results) == (1, 2)
    with pytest.raises(ZeroDivisionError):
        next(results)
    results.close()


def test_cf_map_timeout_from_callable(cf_ex):
    # adapted from test_map_timeout_from_callable (newer CPython): a TimeoutError the callable
    # raises reaches the caller as that error, with or without a map() timeout. Whether map()
    # goes on afterwards differs between CPython versions, and is left out.
    for timeout in (None, 60):
        results = cf_ex.map(cf_timeout_on_one, [0, 1, 2, 3], timeout=timeout)
        assert next(results) == 0
        with pytest.raises(TimeoutError) as info:
            next(results)
        assert type(info.value) is TimeoutError, repr(info.value)
        results.close()


def test_cf_map_timeout(cf_ex, tmp_path):
    # as-is (a gate in place of time.sleep(6)): map()'s timeout raises TimeoutError, and the
    # remaining calls are cancelled, so the iterator is exhausted
    gate, opened = str(tmp_path / "gate"), str(tmp_path / "open")
    open(opened, "w").close()
    results = []
    try:
        iterator = cf_ex.map(wait_for_file, [opened, opened, gate], [None] * 3, timeout=2)
        with pytest.raises(concurrent.futures.TimeoutError):
            for result in iterator:
                results.append(result)
        assert results in ([None, None], [None], [])
        for _ in range(2):
            with pytest.raises(StopIteration):
                next(iterator)
    finally:
        open(gate, "w").close()


def test_cf_map_close(cf_ex):
    # as-is
    for kwargs in ({}, {"chunksize": 3}):
        results = cf_ex.map(divmod, [5, 5, 5, 5], [2, 0, 3, 5], timeout=60, **kwargs)
        assert next(results) == (2, 1)
        results.close()
        for _ in range(2):
            with pytest.raises(StopIteration):
                next(results)


def test_cf_map_buffersize_type_validation(cf_ex):
    # as-is
    for buffersize in ("foo", 2.0):
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            cf_ex.map(str, range(4), buffersize=buffersize)


def test_cf_map_buffersize_value_validation(cf_ex):
    # as-is
    for buffersize in (0, -1):
        with pytest.raises(ValueError, match="buffersize must be None or > 0"):
            cf_ex.map(str, range(4), buffersize=buffersize)


def test_cf_map_buffersize(cf_ex):
    # as-is
    for buffersize in (1, 2, 4, 8):
        assert list(cf_ex.map(str, range(4), buffersize=buffersize, timeout=60)) == ["0", "1", "2", "3"]


def test_cf_map_buffersize_on_multiple_iterables(cf_ex):
    # as-is
    for buffersize in (1, 2, 4, 8):
        assert list(cf_ex.map(operator.add, range(4), range(4), buffersize=buffersize, timeout=60)) == [0, 2, 4, 6]


def test_cf_map_buffersize_on_infinite_iterable(cf_ex):
    # as-is
    results = cf_ex.map(str, itertools.count(), buffersize=2, timeout=60)
    assert [next(results, None) for _ in range(3)] == ["0", "1", "2"]
    results.close()


def test_cf_map_buffersize_on_multiple_infinite_iterables(cf_ex):
    # as-is
    results = cf_ex.map(operator.add, itertools.count(), itertools.count(), buffersize=2, timeout=60)
    assert [next(results, None) for _ in range(3)] == [0, 2, 4]
    results.close()


def test_cf_map_buffersize_on_empty_iterable(cf_ex):
    # as-is
    assert next(cf_ex.map(str, [], buffersize=2), None) is None


def test_cf_map_buffersize_without_iterable(cf_ex):
    # as-is, and the same without buffersize
    assert next(cf_ex.map(str, buffersize=2), None) is None
    assert list(cf_ex.map(str)) == []


def test_cf_map_buffersize_when_buffer_is_full(method):
    # as-is: a map() nobody iterates has read only buffersize items when the executor is done
    ex = make_executor(2, method)
    ints = iter(range(4))
    try:
        ex.map(str, ints, buffersize=2)
    finally:
        cf_shutdown(ex, wait=True)
    assert next(ints) == 2, "should have read only buffersize items of the input"


def test_cf_shutdown_race_issue12456(method):
    # as-is: more calls than workers, then shutdown at once
    ex = make_executor(2, method)
    try:
        ex.map(str, [2] * 3)
    finally:
        cf_shutdown(ex)


def test_cf_no_stale_references(cf_ex):
    # as-is: the future is dropped at once; once its task has run, nothing holds the object
    obj = cf_Object()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())  # noqa: F841 (kept for its callback)
    cf_ex.submit(obj.my_method)
    del obj
    wait_until(lambda: gc.collect() is not None and collected.is_set(), 30,
               "the object of a submitted (and dropped) future collected")


def test_cf_max_workers_negative():
    # as-is
    for number in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            mplite.ProcessPoolExecutor(max_workers=number)


@pytest.mark.parametrize("buffersize", [None, 3], ids=["all-at-once", "buffersize-3"])
def test_cf_free_reference(cf_ex, buffersize):
    # as-is (bpo-14406); issue 16's behaviour 1: map() lets go of each result once it has
    # yielded it, so a map over large results holds one at a time. Nothing of map() may keep
    # it: not a list of the results, nor a local variable of the generator.
    for obj in cf_ex.map(cf_make_object, range(10), timeout=60, buffersize=buffersize):
        wr = weakref.ref(obj)
        del obj
        gc.collect()
        assert wr() is None, "map() still holds a result it has yielded"


def cf_future_raises_falsey_exceptions():
    """Does this Python's own Future.result() raise an exception that is false as a bool? Only
    since CPython's fix for gh-132063; before it, result() returns None for one (3.11 does)."""
    future = concurrent.futures.Future()
    future.set_exception(cf_FalseyBoolError("probe"))
    try:
        future.result(timeout=0)
    except cf_FalseyBoolError:
        return True
    return False


def test_cf_swallows_falsey_exceptions(cf_ex):
    # adapted (gh-132063): an exception that is false as a bool still fails its future. Whether
    # result() raises it is up to the Future class of the Python running the tests (mplite's
    # futures are the standard library's), so result() is checked only where that one raises
    # it; exception() must hold it everywhere (the stdlib's executor itself loses it on 3.11).
    for exc_type, msg in ((cf_FalseyBoolError, "boolbool"), (cf_FalseyLenError, "lenlen")):
        future = cf_ex.submit(cf_raiser, exc_type, msg)
        error = future.exception(timeout=60)
        assert type(error) is exc_type and str(error) == msg, repr(error)
        if cf_future_raises_falsey_exceptions():
            with pytest.raises(exc_type, match=msg):
                future.result()


# ---------------------------------------------------------------------------------------------
# test_process_pool.py (ProcessPoolExecutorTest)
# ---------------------------------------------------------------------------------------------

def test_cf_killed_child(method, tmp_path):
    # adapted from test_killed_child (which takes a process from executor._processes and wants
    # the whole pool broken): mplite is better on purpose. The terminated worker's future fails
    # with WorkerDiedError, a BrokenProcessPool, and the executor goes on (README).
    pid_file = tmp_path / "pid"
    with make_executor(2, method) as ex:
        future = ex.submit(_bg_pid_then_sleep, str(pid_file), 30)
        wait_files([pid_file], 60, "the task to start")
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)  # what Process.terminate() does
        error = future.exception(timeout=60)
        assert isinstance(error, mplite.WorkerDiedError) and isinstance(error, BrokenProcessPool), repr(error)
        assert ex.submit(pow, 2, 8).result(timeout=60) == 256
    assert wait_gone([pid]) == []


def test_cf_broken_process_pool_traceback(method, tmp_path):
    # adapted from test_broken_process_pool_traceback (which kills a process of
    # executor._processes): each failed future raises its own exception, whose traceback shows
    # this file once (a shared exception would gather a frame per result() call). With mplite
    # only the futures whose worker died fail (README); the third runs on a new worker.
    gate = str(tmp_path / "gate")
    markers = [str(tmp_path / ("started-%d" % i)) for i in range(3)]
    with make_executor(2, method) as ex:
        try:
            futures = [ex.submit(_bg_gated, markers[i], gate, i) for i in range(3)]
            wait_until(lambda: sum(map(os.path.exists, markers)) == 2, 60, "both workers busy")
            running = [i for i in range(3) if os.path.exists(markers[i])]
            pids = [int(open(markers[i]).read()) for i in running]
            for pid in pids:
                kill_hard(pid)
        finally:
            open(gate, "w").close()
        errors = {}
        for i, future in enumerate(futures):
            try:
                value = future.result(timeout=60)
            except BrokenProcessPool as exc:
                errors[i] = exc
                frames = [fr for fr in traceback.extract_tb(exc.__traceback__) if fr.filename == __file__]
                assert len(frames) == 1, frames
            else:
                assert value == i
        assert sorted(errors) == running
        assert errors[running[0]] is not errors[running[1]]
        assert all(isinstance(e, mplite.WorkerDiedError) for e in errors.values())
    assert wait_gone(pids) == []


def test_cf_map_chunksize(cf_ex):
    # as-is: chunksize is accepted (and ignored: README), and must be >= 1
    expected = list(map(pow, range(40), range(40)))
    for chunksize in (6, 50, 40):
        assert list(cf_ex.map(pow, range(40), range(40), chunksize=chunksize, timeout=60)) == expected
    with pytest.raises(ValueError):
        list(cf_ex.map(pow, range(40), range(40), chunksize=-1))


def test_cf_traceback(cf_ex):
    # as-is: the worker's traceback is the __cause__ of the raised exception, as text, and the
    # program's excepthook shows the worker's line
    future = cf_ex.submit(cf_traceback_task)
    with pytest.raises(Exception) as info:
        future.result(timeout=60)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    cause = exc.__cause__
    assert type(cause).__name__ == "_RemoteTraceback", repr(cause)
    assert "raise RuntimeError(123)  # cf marker comment" in cause.tb, cause.tb
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            raise exc
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123)  # cf marker comment" in err.getvalue(), err.getvalue()


def test_cf_traceback_when_child_process_terminates_abruptly(method):
    # adapted from test_traceback_when_child_process_terminates_abruptly (gh-139462, CPython's
    # text is in a _RemoteTraceback __cause__): mplite's WorkerDiedError, a BrokenProcessPool,
    # says in its message how the worker ended
    with make_executor(1, method) as ex:
        future = ex.submit(os._exit, 99)
        with pytest.raises(BrokenProcessPool) as info:
            future.result(timeout=60)
    assert isinstance(info.value, mplite.WorkerDiedError), repr(info.value)
    assert re.search(r"exit\w*\b.*\b99\b", str(info.value)), str(info.value)


def test_cf_resources_gced_in_workers(cf_ex, tmp_path):
    # as-is (test_ressources_gced_in_workers; a file written by __del__ in the worker, in place
    # of a Manager's Event): the worker lets go of a task's arguments once it is done
    path = tmp_path / "collected-in-worker"
    assert cf_ex.submit(id, DelMarker(str(path))).result(timeout=60) is not None
    wait_files([path], 15, "a finished task's argument collected in the worker")


def test_cf_max_tasks_per_child(method):
    # adapted: the stdlib refuses max_tasks_per_child under fork; mplite supports it with every
    # start method (README). executor._processes is not looked at.
    ex = make_executor(1, method, max_tasks_per_child=3)
    try:
        pids = [ex.submit(os.getpid).result(timeout=60) for _ in range(4)]
    finally:
        cf_shutdown(ex)
    assert pids[0] == pids[1] == pids[2] != pids[3], pids
    assert wait_gone(set(pids)) == []


@posix_only("a worker's command line (Windows gives its program's name only)")
def test_cf_max_tasks_per_child_defaults_to_spawn_context():
    # adapted: CPython reads executor._mp_context; here the worker's command line shows spawn
    ex = mplite.ProcessPoolExecutor(1, max_tasks_per_child=3)
    try:
        cmdline = ex.submit(cf_worker_cmdline).result(timeout=60)
    finally:
        cf_shutdown(ex)
    assert "spawn_main" in cmdline, cmdline


def test_cf_max_tasks_per_child_pending_tasks_gh115634(method):
    # as-is (also under fork): workers reaching their limit with work queued behind them
    for max_workers, max_tasks, num_tasks in [(1, 2, 6), (2, 2, 8)]:
        ex = make_executor(max_workers, method, max_tasks_per_child=max_tasks)
        try:
            futures = [ex.submit(cf_mul, i, 2) for i in range(num_tasks)]
            assert [f.result(timeout=60) for f in futures] == [i * 2 for i in range(num_tasks)]
        finally:
            cf_shutdown(ex, wait=True, cancel_futures=True)


@pytest.mark.parametrize("shutdown,drop_reference", [(True, False), (True, True), (False, True)],
                         ids=["shutdown-no-wait", "shutdown-no-wait-then-dropped", "dropped"])
def test_cf_stranded_worker_exit(method, shutdown, drop_reference, tmp_path):
    # from test_shutdown_no_wait_max_tasks_gh119592 (shutdown-no-wait: as-is) and
    # test_gc_during_max_tasks_worker_exit_gh152967 (the "dropped" cases: adapted). A
    # max_tasks_per_child=1 worker exits at its limit with work still queued, after
    # shutdown(wait=False) and/or after the executor was garbage-collected. The stdlib fails the
    # rest with BrokenProcessPool once the executor is collected; mplite is better on purpose:
    # a dropped executor finishes what it was given (README), so every future gets its result.
    gate = str(tmp_path / "gate")
    markers = [str(tmp_path / ("started-%d" % i)) for i in range(3)]
    ex = make_executor(1, method, max_tasks_per_child=1)
    try:
        futures = [ex.submit(_bg_gated, markers[i], gate, i) for i in range(3)]
        wait_files(markers[:1], 60, "the first task to start")
        if shutdown:
            cf_shutdown(ex, wait=False)
        if drop_reference:
            ref = weakref.ref(ex)
            ex = None
            wait_until(lambda: gc.collect() is not None and ref() is None, 30, "the executor collected")
    finally:
        open(gate, "w").close()
    try:
        assert [f.result(timeout=60) for f in futures] == [0, 1, 2]
    finally:
        if ex is not None:
            cf_shutdown(ex)


def test_cf_max_tasks_early_shutdown(method):
    # as-is (also under fork): shutdown while workers are being replaced
    ex = make_executor(3, method, max_tasks_per_child=1)
    try:
        futures = [ex.submit(cf_mul, i, i) for i in range(6)]
    finally:
        cf_shutdown(ex)
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(6)]


# ---------------------------------------------------------------------------------------------
# test_shutdown.py (ExecutorShutdownTest, ProcessPoolShutdownTest)
# ---------------------------------------------------------------------------------------------

CF_SLEEP_AND_PRINT = '''
import multiprocessing, sys, time
import mplite


def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()

'''


def test_cf_run_after_shutdown(method):
    # as-is
    ex = make_executor(2, method)
    cf_shutdown(ex)
    with pytest.raises(RuntimeError):
        ex.submit(pow, 2, 5)


def test_cf_interpreter_shutdown(method, tmp_path):
    # as-is (2 workers): a task submitted just before the program ends still runs
    rc, out, err = cf_run_script(tmp_path, CF_SLEEP_AND_PRINT + '''
if __name__ == "__main__":
    t = mplite.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(sys.argv[1]))
    t.submit(sleep_and_print, 1.0, "apple")
''', method)
    assert rc == 0 and err == "" and out.strip() == "apple", (rc, out, err)


def test_cf_submit_after_interpreter_shutdown(method, tmp_path):
    # as-is: submit() from an atexit hook that runs after the executor's own
    rc, out, err = cf_run_script(tmp_path, '''
import atexit


@atexit.register
def run_last():
    try:
        t.submit(id, None)
    except RuntimeError:
        print("runtime-error")
        raise


import multiprocessing, sys
import mplite

if __name__ == "__main__":
    t = mplite.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(sys.argv[1]))
    t.submit(id, 42).result()
''', method)
    assert "RuntimeError: cannot schedule new futures" in err, err
    assert out.strip() == "runtime-error", (rc, out, err)


def test_cf_hang_issue12364(method):
    # as-is (50 tasks of 0.05 s in place of 0.1 s)
    ex = make_executor(2, method)
    try:
        futures = [ex.submit(time.sleep, 0.05) for _ in range(50)]
    finally:
        cf_shutdown(ex)
    for f in futures:
        assert f.result(timeout=0) is None


def test_cf_cancel_futures(method):
    # as-is; issue 16's behaviour 2. A future counts as running once mplite has given it to a
    # worker, and each worker (even one still starting) gets at most one message before it is
    # ready: so a shutdown(cancel_futures=True) right after submitting cancels most of the 50
    # and lets at least one finish, as the stdlib's does.
    ex = make_executor(2, method)
    try:
        futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    finally:
        cf_shutdown(ex, cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) > 20, "only %d of 50 cancelled" % len(cancelled)
    for f in others:
        assert f.done(), f
        assert f.exception(timeout=0) is None
    assert len(others) > 0, "all 50 cancelled: none of them counted as running"


def test_cf_hang_gh83386(method, tmp_path):
    # adapted: CPython skips this for process pools ("hangs", gh-83386); mplite does better:
    # shutdown(wait=False) with a task running, then the program ends; the task finishes
    rc, out, err = cf_run_script(tmp_path, CF_SLEEP_AND_PRINT + '''
if __name__ == "__main__":
    t = mplite.ProcessPoolExecutor(max_workers=2, mp_context=sys.argv[1])
    t.submit(sleep_and_print, 1.0, "apple")
    t.shutdown(wait=False)
''', method)
    assert rc == 0 and err == "" and out.strip() == "apple", (rc, out, err)


CF_HANG_94440 = '''
import os, sys, threading
import mplite


def shut(ex, done):
    ex.shutdown(wait=True)
    done.set()


if __name__ == "__main__":
    method, rounds = sys.argv[1], int(sys.argv[2])
    for i in range(rounds):
        ex = mplite.ProcessPoolExecutor(max_workers=1, mp_context=method)
        ex.submit(int).result(timeout=60)
        ex.submit(int).cancel()
        done = threading.Event()
        threading.Thread(target=shut, args=(ex, done), daemon=True).start()
        if not done.wait(20):
            print("HANG: shutdown(wait=True) had not returned after 20 s in round %d" % i, flush=True)
            os._exit(3)
    print("ALL-RETURNED", flush=True)
'''


def test_cf_hang_gh94440(method, tmp_path):
    # as-is, repeated: the hang is a race; issue 16's behaviour 3. In a child script, so that
    # a hang leaves nothing behind here.
    rc, out, err = cf_run_script(tmp_path, CF_HANG_94440, method, 20)
    assert rc == 0 and "ALL-RETURNED" in out, (rc, out, err)


def test_cf_processes_terminate(method, tmp_path):
    # adapted from test_processes_terminate (executor._processes, and the stdlib's on-demand
    # start, which mplite doesn't do: README): the workers, found by their pids, are gone once
    # shutdown() has returned with the work done
    gate = str(tmp_path / "gate")
    ex = make_executor(2, method)
    try:
        pids = executor_pids(ex, tmp_path, 2)
        futures = [ex.submit(wait_for_file, gate, i) for i in range(3)]
    finally:
        open(gate, "w").close()
        cf_shutdown(ex)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2]
    assert wait_gone(pids) == []


def test_cf_context_manager_shutdown(method, tmp_path):
    # adapted (workers found by their pids, not executor._processes)
    with make_executor(2, method) as ex:
        pids = executor_pids(ex, tmp_path, 2)
        assert list(ex.map(abs, range(-5, 5), timeout=60)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert wait_gone(pids) == []


def test_cf_del_shutdown(method, tmp_path):
    # adapted from test_del_shutdown (workers found by their pids and the engine thread by its
    # name, in place of executor._processes, _executor_manager_thread and _call_queue); issue
    # 16's behaviour 4: an executor dropped without shutdown() shuts down once it is collected,
    # while a map() iterator made before is still alive, and that iterator yields every result.
    ex, pids, engines = watched_executor(method, tmp_path)
    results = ex.map(abs, range(-5, 5))
    try:
        del ex
        gc.collect()
        assert wait_gone(pids) == [], "the workers of a collected executor still run"
        wait_engine_threads_gone(engines)
        assert bounded(lambda: list(results), 30) == [abs(v) for v in range(-5, 5)]
    finally:
        results = None  # a failed test must not keep the executor alive through its map
        gc.collect()


def test_cf_shutdown_no_wait(method, tmp_path):
    # adapted (pids and the engine thread, in place of executor._processes, _call_queue and
    # _executor_manager_thread)
    ex, pids, engines = watched_executor(method, tmp_path)
    results = ex.map(abs, range(-5, 5))
    cf_shutdown(ex, wait=False)
    assert wait_gone(pids) == []
    wait_engine_threads_gone(engines)
    assert bounded(lambda: list(results), 30) == [abs(v) for v in range(-5, 5)]


@pytest.mark.parametrize("max_workers", [2, 4])
def test_cf_shutdown_gh_132969(method, max_workers):
    # adapted from test_shutdown_gh_132969_case_1/_2 (mplite's engine thread, found by name, in
    # place of _executor_manager_thread; also under fork): max_tasks_per_child=1, a failing
    # task, then shutdown(wait=False): no error, no hang
    before = engine_threads()
    ex = make_executor(max_workers, method, max_tasks_per_child=1)
    engines = engine_threads() - before
    try:
        f1 = ex.submit(cf_good_task, 1)
        f2 = ex.submit(cf_failing_task, 2)
        f3 = ex.submit(cf_good_task, 3)
        result = 0
        try:
            result += f1.result(timeout=60)
            result += f2.result(timeout=60)
            result += f3.result(timeout=60)
        except ValueError:
            pass  # stop at the first failure
    finally:
        cf_shutdown(ex, wait=False)
    time.sleep(0.2)
    wait_engine_threads_gone(engines, 30)
    assert result == 1
    assert f3.result(timeout=0) == 3


# ---------------------------------------------------------------------------------------------
# test_init.py
# ---------------------------------------------------------------------------------------------

def test_cf_initializer(method):
    # as-is
    ex = make_executor(2, method, initializer=cf_init, initargs=("initialized",))
    try:
        futures = [ex.submit(cf_get_init_status) for _ in range(2)]
        assert [f.result(timeout=60) for f in futures] == ["initialized"] * 2
    finally:
        cf_shutdown(ex)


def test_cf_failing_initializer(method):
    # adapted from FailingInitializerMixin.test_initializer: the stdlib logs the initializer's
    # error; mplite puts its traceback in the BrokenProcessPool's message (README). And where
    # CPython polls executor._broken, this polls submit() until it raises BrokenExecutor.
    ex = make_executor(2, method, initializer=cf_init_fail)

    def submit_refused():
        try:
            ex.submit(cf_get_init_status)
        except BrokenExecutor:
            return True
        return False

    try:
        try:
            future = ex.submit(cf_get_init_status)
        except BrokenExecutor as exc:  # perhaps already broken
            error = exc
        else:
            error = future.exception(timeout=60)
            assert isinstance(error, BrokenExecutor), repr(error)
        assert "ValueError: error in initializer" in str(error), str(error)
        wait_until(submit_refused, 30, "submit() refused by a broken executor")
        with pytest.raises(BrokenExecutor):
            ex.submit(cf_get_init_status)
    finally:
        cf_shutdown(ex)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_cf_failing_initializer_leaks_nothing(start_method, tmp_path):
    # adapted from FailingInitializerResourcesTest (gh-104090), which stops the resource tracker
    # by hand to read its exit code: here a child script's resource tracker must not report
    # leaked resources (it says so on stderr at exit)
    rc, out, err = cf_run_script(tmp_path, '''
import sys, time
import mplite
from concurrent.futures import BrokenExecutor


def init_fail():
    time.sleep(0.1)
    raise ValueError("error in initializer")


if __name__ == "__main__":
    ex = mplite.ProcessPoolExecutor(2, mp_context=sys.argv[1], initializer=init_fail)
    try:
        ex.submit(int).result(timeout=60)
    except BrokenExecutor:
        print("broken")
    ex.shutdown()
''', start_method)
    assert rc == 0 and out.strip() == "broken", (rc, out, err)
    assert "leaked" not in err, err


# ---------------------------------------------------------------------------------------------
# test_deadlock.py (ExecutorDeadlockTest)
# ---------------------------------------------------------------------------------------------

# name: (function, arguments, what CPython expects; None where the ported test is adapted)
CF_DEADLOCK_CASES = {
    "error_at_task_pickle": (id, (cf_ErrorAtPickle(),), pickle.PicklingError),
    "exit_at_task_unpickle": (id, (cf_ExitAtUnpickle(),), None),
    "error_at_task_unpickle": (id, (cf_ErrorAtUnpickle(),), None),
    "crash_at_task_unpickle": (id, (cf_CrashAtUnpickle(),), BrokenProcessPool),
    "crash_during_func_exec_on_worker": (cf_crash, (), BrokenProcessPool),
    "exit_during_func_exec_on_worker": (cf_exit, (), SystemExit),
    "error_during_func_exec_on_worker": (cf_raise_error, (RuntimeError,), RuntimeError),
    "crash_during_result_pickle_on_worker": (cf_return_instance, (cf_CrashAtPickle,), BrokenProcessPool),
    "exit_during_result_pickle_on_worker": (cf_return_instance, (cf_ExitAtPickle,), SystemExit),
    "error_during_result_pickle_on_worker": (cf_return_instance, (cf_ErrorAtPickle,), pickle.PicklingError),
    "error_during_result_unpickle_in_result_handler": (cf_return_instance, (cf_ErrorAtUnpickle,), None),
    "exit_during_result_unpickle_in_result_handler": (cf_return_instance, (cf_ExitAtUnpickle,), None),
}


@pytest.mark.parametrize("case", sorted(CF_DEADLOCK_CASES))
def test_cf_deadlock(method, case):
    # From the test_<case> tests: errors, exits and crashes while a task's arguments and result
    # are pickled and rebuilt, and while it runs, each on a fresh 2-worker executor. Where
    # CPython expects an error type, it is asked for as-is. Adapted (None above): the stdlib
    # breaks the whole pool with BrokenProcessPool when a task's arguments can't be rebuilt in
    # the worker, or its result in the parent; mplite is better on purpose, failing only that
    # task's future. Every case also checks mplite's documented promise that the other futures
    # complete and the executor goes on.
    func, args, expected = CF_DEADLOCK_CASES[case]
    ex = make_executor(2, method)
    try:
        before = ex.submit(cf_mul, 2, 3)
        future = ex.submit(func, *args)
        after = ex.submit(cf_mul, 3, 4)
        try:
            error = future.exception(timeout=60)
        except concurrent.futures.TimeoutError:
            pytest.fail("deadlock: the future of case %s not done after 60 s" % case)
        if expected is not None:
            assert isinstance(error, expected), repr(error)
        else:
            assert isinstance(error, BaseException) and not isinstance(error, concurrent.futures.CancelledError), \
                repr(error)
        assert (before.result(timeout=60), after.result(timeout=60)) == (6, 12)
        assert ex.submit(pow, 2, 8).result(timeout=60) == 256
    finally:
        cf_shutdown(ex)


@pytest.mark.parametrize("case", ["error", "exit"])
def test_cf_result_pickling_error_is_the_error_raised(cf_ex, case):
    # Issue 16's behaviour 5 in full: a result whose pickling raises fails its future with the
    # very exception raised (so `except pickle.PicklingError` around result() catches it), and
    # mplite's explanation (which task, its result can't be pickled) stays in the traceback text,
    # as the exception's __cause__.
    cls, expected = {"error": (cf_ErrorAtPickle, pickle.PicklingError), "exit": (cf_ExitAtPickle, SystemExit)}[case]
    future = cf_ex.submit(cf_return_instance, cls)
    error = future.exception(timeout=60)
    assert type(error) is expected, repr(error)
    if case == "error":
        assert str(error) == "Error in pickle"
        with pytest.raises(pickle.PicklingError):
            future.result()
    else:
        assert error.code == 1
    assert error.__cause__ is not None, "mplite's explanation is not the __cause__"
    cause = error.__cause__
    text = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))
    assert "cf_return_instance" in text and "result" in text and "pickl" in text, text
    assert cf_ex.submit(pow, 2, 8).result(timeout=60) == 256


def test_cf_shutdown_deadlock(method):
    # as-is: a worker that crashes after shutdown() was called
    with make_executor(2, method) as ex:
        future = ex.submit(cf_crash, delay=0.1)
        cf_shutdown(ex, wait=True)
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=0)


def test_cf_shutdown_deadlock_pickle(method):
    # adapted (bpo-39104): mplite's engine thread, found by name, in place of
    # _executor_manager_thread: a task that fails to pickle after shutdown(wait=False)
    before = engine_threads()
    with make_executor(2, method) as ex:
        engines = engine_threads() - before
        assert ex.submit(id, 42).result(timeout=60)
        future = ex.submit(id, cf_ErrorAtPickle())
        cf_shutdown(ex, wait=False)
        with pytest.raises(pickle.PicklingError):
            future.result(timeout=60)
    wait_engine_threads_gone(engines)


def test_cf_crash_big_data(method):
    # as-is (gh-94777): workers that crash while a large argument is being sent
    data = "a" * (4 * 1024 * 1024 + 1)
    with make_executor(2, method) as ex:
        with pytest.raises(BrokenProcessPool):
            list(ex.map(cf_crash_with_data, [data] * 10, timeout=60))
    cf_shutdown(ex, wait=True)


# ---------------------------------------------------------------------------------------------
# test_wait.py (WaitTests): Futures in fixed states are made through Future's public API
# ---------------------------------------------------------------------------------------------

def test_cf_wait_20369(cf_ex):
    # as-is (bpo-20369): the same future twice
    future = cf_ex.submit(cf_mul, 1, 2)
    done, not_done = concurrent.futures.wait([future, future], timeout=60,
                                             return_when=concurrent.futures.ALL_COMPLETED)
    assert (done, not_done) == ({future}, set())


@contextlib.contextmanager
def cf_pending(ex, tmp_path):
    """A future whose task waits, pending, until the block ends: then its gate opens, and its
    result is collected (a gate in place of CPython's long sleeps)."""
    gate = str(tmp_path / "gate")
    future = ex.submit(wait_for_file, gate, None)
    try:
        yield future
    finally:
        open(gate, "w").close()
    future.result(timeout=60)


def test_cf_wait_first_completed(cf_ex, tmp_path):
    # as-is
    cancelled = cf_future("cancelled")
    future1 = cf_ex.submit(cf_mul, 21, 2)
    with cf_pending(cf_ex, tmp_path) as future2:
        done, not_done = concurrent.futures.wait([cancelled, future1, future2], timeout=60,
                                                 return_when=concurrent.futures.FIRST_COMPLETED)
        assert done == {future1}
        assert not_done == {cancelled, future2}


def test_cf_wait_first_completed_some_already_completed(cf_ex, tmp_path):
    # as-is
    cancelled_notified, successful = cf_future("cancelled_and_notified"), cf_future("successful")
    with cf_pending(cf_ex, tmp_path) as future1:
        finished, pending = concurrent.futures.wait([cancelled_notified, successful, future1], timeout=60,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
        assert finished == {cancelled_notified, successful}
        assert pending == {future1}


def test_cf_wait_first_exception(cf_ex, tmp_path):
    # as-is
    gate1, gate2 = str(tmp_path / "gate1"), str(tmp_path / "gate2")
    try:
        future1 = cf_ex.submit(cf_mul, 2, 21)
        future2 = cf_ex.submit(cf_wait_and_raise, gate1)
        future3 = cf_ex.submit(wait_for_file, gate2, None)

        def wait_for_future1():  # future1 is done before future2 raises
            future1.result(timeout=60)
            open(gate1, "w").close()

        thread = threading.Thread(target=wait_for_future1, daemon=True)
        thread.start()
        finished, pending = concurrent.futures.wait([future1, future2, future3], timeout=60,
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
        assert finished == {future1, future2}
        assert pending == {future3}
        thread.join(60)
        assert not thread.is_alive()
    finally:
        open(gate1, "w").close()
        open(gate2, "w").close()
    future3.result(timeout=60)


def test_cf_wait_first_exception_some_already_complete(cf_ex, tmp_path):
    # as-is
    successful, cancelled, cancelled_notified = (cf_future("successful"), cf_future("cancelled"),
                                                 cf_future("cancelled_and_notified"))
    future1 = cf_ex.submit(divmod, 21, 0)
    with cf_pending(cf_ex, tmp_path) as future2:
        finished, pending = concurrent.futures.wait(
            [successful, cancelled, cancelled_notified, future1, future2], timeout=60,
            return_when=concurrent.futures.FIRST_EXCEPTION)
        assert finished == {successful, cancelled_notified, future1}
        assert pending == {cancelled, future2}


def test_cf_wait_first_exception_one_already_failed(cf_ex, tmp_path):
    # as-is
    failed = cf_future("exception")
    with cf_pending(cf_ex, tmp_path) as future1:
        finished, pending = concurrent.futures.wait([failed, future1], timeout=60,
                                                    return_when=concurrent.futures.FIRST_EXCEPTION)
        assert finished == {failed}
        assert pending == {future1}


def test_cf_wait_all_completed(cf_ex):
    # as-is
    fixed = [cf_future("successful"), cf_future("cancelled_and_notified"), cf_future("exception")]
    future1 = cf_ex.submit(divmod, 2, 0)
    future2 = cf_ex.submit(cf_mul, 2, 21)
    finished, pending = concurrent.futures.wait(fixed + [future1, future2], timeout=60,
                                                return_when=concurrent.futures.ALL_COMPLETED)
    assert finished == set(fixed + [future1, future2])
    assert pending == set()


def test_cf_wait_timeout(cf_ex, tmp_path):
    # as-is
    fixed = [cf_future("cancelled_and_notified"), cf_future("exception"), cf_future("successful")]
    with cf_pending(cf_ex, tmp_path) as future:
        finished, pending = concurrent.futures.wait(fixed + [future], timeout=0.05,
                                                    return_when=concurrent.futures.ALL_COMPLETED)
        assert finished == set(fixed)
        assert pending == {future}


# ---------------------------------------------------------------------------------------------
# test_as_completed.py (AsCompletedTests)
# ---------------------------------------------------------------------------------------------

def test_cf_as_completed_no_timeout(cf_ex):
    # as-is (with a deadline)
    fixed = [cf_future("cancelled_and_notified"), cf_future("exception"), cf_future("successful")]
    future1 = cf_ex.submit(cf_mul, 2, 21)
    future2 = cf_ex.submit(cf_mul, 7, 6)
    completed = set(concurrent.futures.as_completed(fixed + [future1, future2], timeout=60))
    assert completed == set(fixed + [future1, future2])


def test_cf_as_completed_future_times_out(cf_ex, tmp_path):
    # as-is (a gate in place of a 1 s sleep)
    gate = str(tmp_path / "gate")
    already_completed = {cf_future("cancelled_and_notified"), cf_future("exception"), cf_future("successful")}
    futures = []
    try:
        for timeout in (0, 0.1):
            completed = set()
            future = cf_ex.submit(wait_for_file, gate, None)
            futures.append(future)
            try:
                for f in concurrent.futures.as_completed(already_completed | {future}, timeout):
                    completed.add(f)
            except concurrent.futures.TimeoutError:
                pass
            assert completed == already_completed
    finally:
        open(gate, "w").close()
    for future in futures:
        future.result(timeout=60)


def test_cf_as_completed_duplicate_futures(cf_ex):
    # as-is (bpo-20367, bpo-31641): duplicates in any iterable are yielded once
    future1 = cf_ex.submit(time.sleep, 0.2)
    completed = list(concurrent.futures.as_completed(itertools.repeat(future1, 3), timeout=60))
    assert len(completed) == 1


# =============================================================================================
# Issue 17: Windows for real. A worker that dies while it boots is seen on the portable path
# too (MPLITE_PORTABLE=1 keeps the parent's copy of each worker's pipe end open until the worker
# is ready, as a Windows parent does): an unguarded script, a __main__ that raises on import, a
# worker killed while it boots. _exit_reason on systems without SIGKILL and with NTSTATUS exit
# codes; durations by perf_counter; the portable wake-up; Ctrl-C while start() waits.
#
# The pool tests run child scripts (spawn), each in its own session, with and without
# MPLITE_PORTABLE=1 (on Windows both are the portable path): an unguarded script must be a file
# run as __main__, and the portable path is chosen when mplite is imported.
# =============================================================================================

# (no imports beyond those at the top of this file)

WIN_PORTABLE = [pytest.param("1", id="portable"), pytest.param("", id="default-path")]
WIN_HANG_S = 90  # a child script still running after this long hangs (the watchdog is WATCHDOG_S)
WIN_PROMPT_S = 60  # what "fails within seconds" may take on a slow, shared machine


def win_run_child(tmp_path, source, args=(), portable="", limit=WIN_HANG_S):
    """Run `source` as the script tmp_path/win_child.py, its own __main__, in its own session,
    with mplite's folder on PYTHONPATH and MPLITE_PORTABLE=portable.

    Returns (exit code, stdout, stderr, wall seconds, the child's pid). Fails the test if the
    child is still running after `limit` seconds (a hang), or if any process of its session
    (a worker, multiprocessing's resource tracker) is left once it has exited."""
    script = tmp_path / "win_child.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)), MPLITE_PORTABLE=portable)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(script)] + list(args), cwd=str(tmp_path), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_session(proc)
            out, err = proc.communicate(timeout=30)
            pytest.fail("hang: the child script had not exited after %s s\nstdout:\n%s\nstderr:\n%s"
                        % (limit, out.decode(errors="replace"), err.decode(errors="replace")[-5000:]))
        elapsed = time.monotonic() - started
        assert_session_ends(proc, "the child script")
    finally:
        kill_session(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"), elapsed, proc.pid


def win_report(rc, out, err):
    return "rc=%s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err[-6000:])


def win_line(out, tag, pid):
    """The fields of the one line `tag pid ...` that the child's own main process printed (a
    worker running the script again must not be mistaken for it)."""
    lines = [line.split(" ", 2) for line in out.splitlines() if line.startswith(tag + " ")]
    mine = [fields[2] if len(fields) > 2 else "" for fields in lines if fields[1] == str(pid)]
    assert len(mine) == 1, (tag, pid, out)
    return mine[0]


# ---------------------------------------------------------------------------------------------
# 1a/1b. An unguarded script, a __main__ that raises on import: BrokenProcessPool within
# seconds, naming the cure
# ---------------------------------------------------------------------------------------------

# How the child scripts start a pool and use it; stage says which call raised. argv: api
# ("tm": TaskManager, "ex": ProcessPoolExecutor), then "init" or "noinit".
WIN_POOL_USE = r'''
def win_use_pool(api, with_init):
    stage, started = "construct", time.monotonic()
    try:
        if api == "tm":
            tm = mplite.TaskManager(2, context="spawn", worker_init=mplite.Task(win_init) if with_init else None)
            try:
                stage = "start"
                tm.start()
                stage = "execute"
                print("RESULT", os.getpid(), tm.execute([mplite.Task(abs, -1), mplite.Task(abs, -2)],
                                                        progress=False), flush=True)
            finally:
                tm.stop()
        else:
            ex = mplite.ProcessPoolExecutor(2, mp_context="spawn", initializer=win_init if with_init else None)
            try:
                stage = "submit"
                future = ex.submit(abs, -1)
                stage = "result"
                print("RESULT", os.getpid(), future.result(), flush=True)
            finally:
                ex.shutdown()
    except BrokenProcessPool as exc:
        print("BROKEN", os.getpid(), repr((stage, type(exc).__name__, str(exc), time.monotonic() - started)),
              flush=True)
'''

# No `if __name__ == "__main__":` around the pool: each spawned worker runs this file again as
# __mp_main__, and its own attempt to start processes fails (exit code 1) before it is ready.
WIN_UNGUARDED_SCRIPT = r'''
import os, sys, time
from concurrent.futures.process import BrokenProcessPool
import mplite


def win_init():
    pass

@@POOL_USE@@
win_use_pool(sys.argv[1], sys.argv[2] == "init")
'''.replace("@@POOL_USE@@", WIN_POOL_USE)

# Guarded, but the script can't be imported in a worker: each spawned worker fails, exit code 1.
WIN_RAISING_MAIN_SCRIPT = r'''
import os, sys, time
from concurrent.futures.process import BrokenProcessPool
import mplite

if __name__ == "__mp_main__":  # a spawned worker importing this script
    raise ImportError("win-boom-5821: this script can't be imported in a worker")


def win_init():
    pass

@@POOL_USE@@
if __name__ == "__main__":
    win_use_pool(sys.argv[1], sys.argv[2] == "init")
'''.replace("@@POOL_USE@@", WIN_POOL_USE)

WIN_APIS = [pytest.param("tm", id="TaskManager"), pytest.param("ex", id="ProcessPoolExecutor")]
WIN_INITS = [pytest.param("init", id="with-init"), pytest.param("noinit", id="no-init")]


def win_check_boot_failure(tmp_path, source, api, init, portable):
    """The child's pool must raise BrokenProcessPool promptly, from the call that waits for the
    workers (start() with a worker_init; execute(), submit() or result() without), and the
    message must say the worker died before it was ready and name the cure."""
    rc, out, err, elapsed, pid = win_run_child(tmp_path, source, [api, init], portable)
    report = win_report(rc, out, err)
    assert rc == 0, report
    assert "RESULT " not in out, "the pool ran tasks with workers that can't start\n" + report
    stage, kind, message, _ = ast.literal_eval(win_line(out, "BROKEN", pid))
    assert kind == "BrokenProcessPool", report
    assert elapsed < WIN_PROMPT_S, "BrokenProcessPool came only after %.0f s\n%s" % (elapsed, report)
    if api == "tm":
        assert stage == ("start" if init == "init" else "execute"), report
    else:
        assert stage in ("submit", "result"), report
    assert 'if __name__ == "__main__":' in message, "the message does not name the cure\n" + report
    assert "exited with code 1" in message, report
    return out, err


@pytest.mark.parametrize("portable", WIN_PORTABLE)
@pytest.mark.parametrize("init", WIN_INITS)
@pytest.mark.parametrize("api", WIN_APIS)
def test_win_unguarded_script_fails_fast_naming_the_main_guard(api, init, portable, tmp_path):
    # issue 17, 1: on Windows this hung for ever (the parent's copy of each worker's pipe end
    # hid its death); MPLITE_PORTABLE=1 emulates that copy on Linux
    out, err = win_check_boot_failure(tmp_path, WIN_UNGUARDED_SCRIPT, api, init, portable)
    # what the workers died of: their own attempt to start processes while importing the script
    assert "bootstrapping phase" in err, win_report(0, out, err)


@pytest.mark.parametrize("portable", WIN_PORTABLE)
@pytest.mark.parametrize("init", WIN_INITS)
@pytest.mark.parametrize("api", WIN_APIS)
def test_win_main_that_raises_in_the_workers_fails_fast(api, init, portable, tmp_path):
    out, err = win_check_boot_failure(tmp_path, WIN_RAISING_MAIN_SCRIPT, api, init, portable)
    assert "win-boom-5821" in err, "the worker's own error is not in the output\n" + win_report(0, out, err)


# ---------------------------------------------------------------------------------------------
# 1c. A worker killed while it boots is replaced: the pool is not left one worker short
# ---------------------------------------------------------------------------------------------

# argv: where the workers boot slowly ("import": importing this script, before a Windows worker
# takes over its pipe; "init": in worker_init, so start() waits), then the markers folder.
# A killer thread kills the first booting worker with Process.kill() (TerminateProcess on
# Windows: exit code -15, as mplite's own kill gives; os.kill would give +15 there).
WIN_BOOT_KILL_SCRIPT = r'''
import gc, multiprocessing, os, sys, threading, time
import mplite

WHERE, MARKERS = sys.argv[1], sys.argv[2]  # spawn gives the workers the parent's sys.argv
BOOT_SECONDS = 5


def win_mark(pid, what):
    open(os.path.join(MARKERS, "%d.%s" % (pid, what)), "w").close()


def win_marked(what):
    return sorted(int(n.split(".")[0]) for n in os.listdir(MARKERS) if n.endswith("." + what))


def win_slow_boot():
    if not os.path.exists(os.path.join(MARKERS, "slow")):  # the first pool, for a baseline: at once
        return
    win_mark(os.getpid(), "booting")
    time.sleep(BOOT_SECONDS)
    win_mark(os.getpid(), "booted")


if __name__ == "__mp_main__" and WHERE == "import":
    win_slow_boot()


def win_init():
    win_slow_boot()


def win_rendezvous(folder, n, limit=30):
    """Wait until n processes have arrived in folder (so n distinct workers run these); the pid."""
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + limit
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def win_open_fds():
    """How many descriptors this process has open (-1: the system can't tell, say Windows)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return len(os.listdir(folder))
    return -1


def win_two_workers(tm, name):
    """The pids of two tasks that wait for each other: two distinct workers; and the descriptors
    this process has open meanwhile."""
    folder = os.path.join(MARKERS, name)
    os.mkdir(folder)
    pids = tm.execute([mplite.Task(win_rendezvous, folder, 2) for _ in range(2)], progress=False)
    return pids, win_open_fds()


def win_killer(box):
    deadline = time.monotonic() + 60
    while len(win_marked("booting")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = win_marked("booting")[0]
    box["still_booting"] = victim not in win_marked("booted")
    next(p for p in multiprocessing.active_children() if p.pid == victim).kill()
    box["killed"] = victim


if __name__ == "__main__":
    # What the parent holds of a dead worker must go when it is replaced, not at some later
    # garbage collection: no automatic one hides what a reference cycle would keep open.
    gc.disable()
    init = mplite.Task(win_init) if WHERE == "init" else None
    with mplite.TaskManager(2, context="spawn", worker_init=init) as tm:  # what a pool holds open
        _, baseline_fds = win_two_workers(tm, "baseline")
    open(os.path.join(MARKERS, "slow"), "w").close()  # from now on, workers boot slowly
    box = {}
    killer = threading.Thread(target=win_killer, args=(box,))
    tm = mplite.TaskManager(2, context="spawn", worker_init=init)
    killer.start()
    # With a worker_init, start() waits for both workers to be ready, and the worker dies in
    # it. Without one, start() returns at once, the two tasks go to the booting workers, and
    # the worker dies holding one of them: it must run on the replacement.
    with tm:
        pids, fds = win_two_workers(tm, "rendezvous")
        killer.join(90)
        more = tm.execute([mplite.Task(abs, -i) for i in range(20)], progress=False)
    print("KILLED", os.getpid(), box.get("killed"), box.get("still_booting"), flush=True)
    print("FDS", os.getpid(), baseline_fds, fds, flush=True)
    print("WORKERS", os.getpid(), " ".join(map(str, pids)), flush=True)
    print("MORE", os.getpid(), more == list(range(20)), flush=True)
    print("BOOTED", os.getpid(), " ".join(map(str, win_marked("booting"))), flush=True)
    print("CHILDREN", os.getpid(), len(multiprocessing.active_children()), flush=True)
'''


@pytest.mark.parametrize("portable", WIN_PORTABLE)
@pytest.mark.parametrize("where", ["import", "init"])
def test_win_worker_killed_while_booting_is_replaced(where, portable, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    rc, out, err, _, pid = win_run_child(tmp_path, WIN_BOOT_KILL_SCRIPT, [where, str(markers)], portable)
    report = win_report(rc, out, err)
    assert rc == 0, report
    killed, still_booting = win_line(out, "KILLED", pid).split()
    assert killed != "None", report
    killed = int(killed)
    assert still_booting == "True", "(test timing) the worker was killed after it had booted\n" + report
    workers = [int(x) for x in win_line(out, "WORKERS", pid).split()]
    # two tasks that wait for each other ran on two distinct workers, neither the killed one
    assert len(set(workers)) == 2 and killed not in workers, "the pool was left one worker short\n" + report
    assert win_line(out, "MORE", pid) == "True", report
    booted = {int(x) for x in win_line(out, "BOOTED", pid).split()}
    assert killed in booted and set(workers) <= booted and len(booted) >= 3, report  # a replacement started
    assert win_line(out, "CHILDREN", pid) == "0", "workers still running after the pool stopped\n" + report
    baseline_fds, fds = win_line(out, "FDS", pid).split()
    # nor does the parent hold anything of the killed worker (its pipe, sentinel, journal) once
    # it is replaced: as many descriptors as in a pool of two healthy workers
    assert fds == baseline_fds, "descriptors of the killed worker are still open\n" + report
    _fault_wait_dead(booted, 10, "workers of the child script")  # win_run_child checked its session too


# ---------------------------------------------------------------------------------------------
# 2. _exit_reason: NTSTATUS crash codes, signals, and systems without SIGKILL
# ---------------------------------------------------------------------------------------------

def test_win_exit_reason_names_ntstatus_crash_codes():
    assert "access violation" in mplite._exit_reason(3221225477)  # 0xC0000005
    assert "stack overflow" in mplite._exit_reason(0xC00000FD)
    for code in (0xC0000005, 0xC00000FD):
        assert "exited with code" not in mplite._exit_reason(code)


def test_win_exit_reason_of_plain_codes_and_of_an_unknown_status():
    assert mplite._exit_reason(1) == "exited with code 1"
    assert mplite._exit_reason(0) == "exited with code 0"
    assert "collected elsewhere" in mplite._exit_reason(None)


def test_win_exit_reason_names_sigterm_without_blaming_memory():
    text = mplite._exit_reason(-15)  # Windows too: Process.terminate() and kill() give -15 there
    assert "SIGTERM" in text and "out of memory" not in text, text


@posix_only("signal.SIGKILL")
def test_win_exit_reason_names_sigkill_as_possibly_out_of_memory():
    text = mplite._exit_reason(-9)
    assert "SIGKILL" in text and "possibly out of memory" in text, text


def test_win_exit_reason_on_a_system_without_sigkill(monkeypatch):
    monkeypatch.delattr(signal, "SIGKILL", raising=False)  # as on Windows
    assert not hasattr(signal, "SIGKILL")
    text = mplite._exit_reason(-15)
    assert "SIGTERM" in text and "out of memory" not in text, text
    text = mplite._exit_reason(-9)
    assert isinstance(text, str) and ("9" in text or "SIGKILL" in text) and "out of memory" not in text, text
    text = mplite._exit_reason(-77)  # no signal has that number
    assert isinstance(text, str) and "77" in text, text


# What a pool does where signal has no SIGKILL (Windows), a worker ended from outside: its task
# fails, the pool goes on (the engine read signal.SIGKILL and broke). The tasks end their own
# worker: os.kill with SIGTERM (on Windows, TerminateProcess).
WIN_NO_SIGKILL_SCRIPT = r'''
import os, signal, sys
import mplite


def win_end_self():
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    if hasattr(signal, "SIGKILL"):
        del signal.SIGKILL  # in this process only: its engine thread is what must cope
    with mplite.TaskManager(2, context="spawn") as tm:
        first = tm.execute([mplite.Task(abs, -1), mplite.Task(win_end_self), mplite.Task(abs, -2)], progress=False)
        again = tm.execute([mplite.Task(abs, -i) for i in range(10)], progress=False)
    print("FIRST", os.getpid(), repr(first))
    print("AGAIN", os.getpid(), again == list(range(10)))
'''


@pytest.mark.parametrize("portable", WIN_PORTABLE)
def test_win_pool_goes_on_after_a_killed_worker_where_there_is_no_sigkill(portable, tmp_path):
    rc, out, err, _, pid = win_run_child(tmp_path, WIN_NO_SIGKILL_SCRIPT, [], portable)
    report = win_report(rc, out, err)
    assert rc == 0, report
    first = ast.literal_eval(win_line(out, "FIRST", pid))
    assert first[0] == 1 and first[2] == 2, report
    assert isinstance(first[1], str) and "ChildProcessError" in first[1], report
    assert "engine failed" not in first[1] and "AttributeError" not in first[1], report
    assert win_line(out, "AGAIN", pid) == "True", report


# ---------------------------------------------------------------------------------------------
# 3. Durations by perf_counter; tiny tasks are still batched
# ---------------------------------------------------------------------------------------------

def win_tiny(x):
    return x * 3 + 1


def test_win_durations_are_measured_with_perf_counter():
    assert mplite._now is time.perf_counter


def test_win_twenty_thousand_tiny_tasks_map_correctly(spool):
    n = 20000
    results = bounded(lambda: spool.map(win_tiny, range(n)), 100)
    assert results == [x * 3 + 1 for x in range(n)]
    assert spool.open_tasks == 0


# ---------------------------------------------------------------------------------------------
# 4. The portable wake-up: a multiprocessing Pipe; an idle engine does not spin
# ---------------------------------------------------------------------------------------------

WIN_WAKE_UP_SCRIPT = r'''
import os, sys, time
import mplite


def win_inc(x):
    return x + 1


if __name__ == "__main__":
    pid = os.getpid()
    names = [getattr(getattr(mplite, name, None), "__name__", "-") for name in ("_WakeUp", "_Selector")]
    print("NAMES", pid, getattr(mplite, "_PORTABLE", "-"), *names, flush=True)
    with mplite.TaskManager(2, context="spawn") as tm:
        good = 0
        for i in range(200):
            tm.submit(mplite.Task(win_inc, i))
            good += tm.take(timeout=None) == i + 1
        print("ROUNDTRIPS", pid, good, tm.open_tasks, flush=True)
        print("MAP", pid, tm.map(win_inc, range(20000)) == list(range(1, 20001)), flush=True)
        time.sleep(0.5)  # whatever the engine still does after the last call (a linger) is over
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(2.0)  # idle: no work, no caller inside mplite
        print("IDLE", pid, time.process_time() - cpu, time.monotonic() - wall, flush=True)
        print("AFTER", pid, tm.execute([mplite.Task(win_inc, i) for i in range(5)], progress=False), flush=True)
'''


@pytest.mark.parametrize("portable", WIN_PORTABLE)
def test_win_wake_up_round_trips_and_an_idle_engine_sleeps(portable, tmp_path):
    rc, out, err, _, pid = win_run_child(tmp_path, WIN_WAKE_UP_SCRIPT, [], portable)
    report = win_report(rc, out, err)
    assert rc == 0, report
    is_portable, wake_up, selector = win_line(out, "NAMES", pid).split()
    if portable or WINDOWS:
        assert (is_portable, wake_up, selector) == ("True", "_PortableWakeUp", "_WaitSelector"), report
    else:
        assert is_portable == "False" and wake_up != "_PortableWakeUp" and selector != "_WaitSelector", report
    assert win_line(out, "ROUNDTRIPS", pid) == "200 0", report
    assert win_line(out, "MAP", pid) == "True", report
    cpu, wall = map(float, win_line(out, "IDLE", pid).split())
    # a spinning engine thread burns about a CPU second per second; a sleeping one next to nothing
    assert wall >= 2.0 and cpu < 0.5, "the idle pool used %.2f s of CPU in %.2f s\n%s" % (cpu, wall, report)
    assert win_line(out, "AFTER", pid) == "[1, 2, 3, 4, 5]", report  # it still wakes for work


# ---------------------------------------------------------------------------------------------
# 5. Ctrl-C while start() waits for a worker_init that never ends
# ---------------------------------------------------------------------------------------------

WIN_CTRL_C_START_SCRIPT = r'''
@@PRELUDE@@


def win_init_blocked(marker_dir):
    open(os.path.join(marker_dir, "%d.started" % os.getpid()), "w").close()
    never = os.path.join(marker_dir, "never")  # no one makes it
    deadline = time.monotonic() + 300  # only so that a lost worker can't run for ever
    while not os.path.exists(never) and time.monotonic() < deadline:
        time.sleep(0.05)


def win_quick(x):
    return x + 1


if __name__ == "__main__":
    scenario, method, marker_dir = sys.argv[1:4]
    tm = mplite.TaskManager(cpu_count=2, context=method, worker_init=mplite.Task(win_init_blocked, marker_dir))
    try:
        tm.start()
    except KeyboardInterrupt:
        interrupted(lambda: tm.submit(mplite.Task(win_quick, 1)))
    print("NO-KEYBOARDINTERRUPT", flush=True)
    sys.exit(3)
'''


@posix_only("SIGINT sent to a process (os.kill)")
@pytest.mark.parametrize("portable", WIN_PORTABLE)
def test_win_ctrl_c_interrupts_start_waiting_for_a_worker_init_that_never_ends(portable, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLITE_PORTABLE", portable)  # the child script inherits it
    child = _FaultScript(tmp_path, "win-ctrlc-start", "spawn", script=WIN_CTRL_C_START_SCRIPT)
    try:
        pids = child.worker_pids(2, pid_file=False)  # both workers are in worker_init; start() waits
        assert len(pids) == 2, pids
        time.sleep(0.5)  # start() is well into its wait
        sent = time.monotonic()
        os.kill(child.proc.pid, signal.SIGINT)  # to the script's main process only, not its workers
        rc = child.wait(30)
        took = time.monotonic() - sent
        out, err = child.stdout, child.stderr
        report = "rc=%s after %.1f s\nstdout:\n%s\nstderr:\n%s" % (rc, took, out, err)
        assert rc == 130, report
        assert "STOPPED-OK" in out, "the pool was not left stopped\n" + report
        assert [line for line in err.splitlines() if line.startswith("KeyboardInterrupt")], report
        assert not re.search(r"^Process \S+:$", err, re.M), "a worker printed a traceback\n" + report
        assert took < 20, report
        _fault_wait_dead(pids, 10, "workers in worker_init after Ctrl-C")
        child.assert_group_gone()
    finally:
        child.cleanup()


# =============================================================================================
# Issue 15: scheduling that never leaves a worker idle while a task waits (item 3), the
# papercuts (item 7), and thread safety of an engine that callers may run themselves (item 4).
#
# The scheduling cases have a known ideal makespan: their time is the sum of sleeps (wall time,
# not CPU) laid out as well as 2 workers allow, plus a few milliseconds of tiny tasks. A wrong
# schedule puts one sleep behind another on one worker: 1.5x or 2x the ideal, every run. Noise
# (a shared, busy 2-core machine) only ever adds time, so each timing case may take one more
# try on a fresh pool, and its limit is the issue's 1.25x the ideal plus SCHED_SLACK_S.
# Where a promise can be shown by order instead of time (a short task done before a gated long
# one), the test uses order, with gates that open by themselves later so a wrong engine fails
# instead of hanging.
# =============================================================================================

from concurrent.futures import FIRST_COMPLETED

SCHED_SLACK_S = 0.25  # on top of 1.25x the ideal: scheduling and the tiny tasks' own time


def sched_limit(ideal):
    """The most a case of this ideal makespan may take: 1.25x (issue 15) plus SCHED_SLACK_S.
    For the cases here (ideal 1 s or 2 s) a wrong schedule takes 2.0 s or 3.0 s: past it."""
    return 1.25 * ideal + SCHED_SLACK_S


# ---------------------------------------------------------------------------------------------
# Task functions (module level, picklable); next_task callables run in the parent
# ---------------------------------------------------------------------------------------------

def sched_identity(x):
    return x


def sched_touch(path):
    open(path, "w").close()
    return "touched"


def sched_wait_for_file(path, limit):
    """Wait up to `limit` seconds for `path` to exist; True if it did."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.path.exists(path)


def sched_nap(seconds, tag=None):
    time.sleep(seconds)
    return tag, os.getpid()


def sched_nap_at(i, slow):
    """A tiny task, except for the i in `slow`, which sleep 1 s."""
    if i in slow:
        time.sleep(1.0)
    return i


def sched_stamp(value):
    """value, with where and when it was made: for the messages of order-based tests."""
    return value, os.getpid(), time.monotonic()


def sched_busy(seconds, value):
    time.sleep(seconds)
    return sched_stamp(value)


def sched_gated_first(gate, value):  # two functions, so that each is never measured before use
    wait_for_file(gate, None, 60)
    return sched_stamp(value)


def sched_gated_second(gate, value):
    wait_for_file(gate, None, 60)
    return sched_stamp(value)


def sched_tag(tid, i):
    return tid, i, os.getpid()


SCHED_PARENT_MARK = None  # set by a test in the parent: forked workers see it, spawned ones don't


def sched_worker_identity():
    return SCHED_PARENT_MARK, os.getppid()


def sched_init_unless(flag, message, delay=0.0):
    """A worker_init that fails (after `delay` s) once `flag` exists: with a flag created after
    start(), only replacement workers fail."""
    time.sleep(delay)
    if os.path.exists(flag):
        raise ValueError(message)


def sched_init_slow_if(flag, seconds):
    """A worker_init that takes `seconds` once `flag` exists: replacement workers start slowly."""
    if os.path.exists(flag):
        time.sleep(seconds)


def sched_then_wait_for_the_file(prev_task, result):  # next_task: the step that waits for `result`
    return Task(sched_wait_for_file, result, 10.0)


def sched_then_wait_for_the_tagged_file(prev_task, result):  # result: sched_nap's (path, pid)
    return Task(sched_wait_for_file, result[0], 10.0)


def sched_then_nap_1s(prev_task, result):  # next_task: a 1 s step of a function measured as tiny
    return Task(sched_nap, 1.0, result)


SCHED_NESTED = []  # the manager the next_task callables below call back into


def sched_then_execute(prev_task, result):
    return SCHED_NESTED[0].execute([Task(adder, result, 1)], progress=False)


def sched_then_map(prev_task, result):
    return SCHED_NESTED[0].map(double, [result])


def sched_then_take(prev_task, result):
    return SCHED_NESTED[0].take(timeout=None)


def sched_then_submit(prev_task, result):
    """next_task that queues more work without waiting for it: allowed, wherever it runs."""
    SCHED_NESTED[0].submit(Task(adder, result, 100))
    return None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def sched_timed(fn):
    start = time.monotonic()
    value = fn()
    return value, time.monotonic() - start


def sched_ready_manager(method, tmp_path, **kwargs):
    """A fresh, started TaskManager(2) whose both workers are up (a rendezvous, a function no
    case measures), so a case's time is its own, not the workers' start."""
    tm = TaskManager(2, context=method, **kwargs)
    tm.start()
    try:
        assert len(worker_pids(tm, tmp_path, 2)) == 2
    except BaseException:
        tm.stop()
        raise
    return tm


def sched_ready_executor(method, tmp_path):
    ex = make_executor(2, method)
    try:
        assert len(executor_pids(ex, tmp_path, 2)) == 2
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    return ex


def sched_within(what, ideal, attempt, tries=2):
    """Run attempt() -> {case: seconds} up to `tries` times (a fresh pool each); pass once every
    case of one try is within sched_limit(ideal); else fail listing every time measured."""
    limit = sched_limit(ideal)
    seen = []
    for _ in range(tries):
        times = attempt()
        seen.append(times)
        if all(t <= limit for t in times.values()):
            return times
    pytest.fail("%s: ideal makespan %.1f s, limit %.2f s; measured %s"
                % (what, ideal, limit, "; ".join(", ".join("%s %.2f s" % kv for kv in t.items()) for t in seen)))


def sched_assert_callers_traceback(exc, caller, *needles):
    """`exc`, raised in the frame `caller`, shows the caller's frames and the reason: every frame
    of its traceback (and of any chained exception that has one) is `caller` or runs under it on
    the caller's stack, none is the engine loop's, and the message names the reason."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for needle in needles:
        assert needle in str(exc), "the reason %r is not in the message:\n%s" % (needle, text)
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, None if e.__suppress_context__ else e.__context__]
        tb = e.__traceback__
        if e is exc:
            assert tb is not None and tb.tb_frame is caller, \
                "the traceback does not start in the caller's frame:\n" + text
        while tb is not None:
            frame = tb.tb_frame
            name = frame.f_code.co_name
            assert name not in ("_run", "_turn", "_reap"), \
                "the engine's frame %s is in the traceback:\n%s" % (name, text)
            stack = frame
            while stack is not None and stack is not caller:
                stack = stack.f_back
            assert stack is caller, ("frame %s (%s:%d) did not run on the caller's stack (another "
                                     "thread's frame, raised again here):\n%s"
                                     % (name, frame.f_code.co_filename, tb.tb_lineno, text))
            tb = tb.tb_next


class SchedCountdown:
    """Opens `gate` once `n` threads have called done() (a thread blocked on the gate waits for
    the others); a timer opens it anyway after `backstop` s, so nothing hangs."""

    def __init__(self, n, gate, backstop=60):
        self.n, self.gate, self.lock = n, str(gate), threading.Lock()
        self.timer = open_gate_later(self.gate, backstop)

    def done(self):
        with self.lock:
            self.n -= 1
            if self.n == 0:
                open(self.gate, "w").close()

    def cancel(self):
        self.timer.cancel()


# ---------------------------------------------------------------------------------------------
# Scheduling: each promise of issue 15, item 3, with a case of known ideal makespan
# ---------------------------------------------------------------------------------------------

def test_sched_chain_step_never_waits_behind_another_task(method, tmp_path):
    # The issue's case: the chain's step waits (up to 10 s) for a file that the second task
    # creates. Held behind the step on its worker (in its batch, or sent ahead to it while the
    # other worker is still starting), the touch runs only after the step gave up: False.
    # Ideal: the workers' start plus milliseconds. Every round must pass, each on a fresh pool.
    # (2.2.0 fails it by chance, on a race of microseconds; the next test makes it certain.)
    for round_ in range(5):
        path = str(tmp_path / ("file-%d" % round_))
        with TaskManager(2, context=method) as tm:
            tasks = [TaskChain(Task(sched_identity, path), next_task=sched_then_wait_for_the_file),
                     Task(sched_touch, path)]
            results, seconds = sched_timed(lambda: bounded(lambda: tm.execute(tasks, progress=False), 60))
        assert results == [True, "touched"], \
            "round %d: the step waited behind the touch for %.2f s: %r" % (round_, seconds, results)


def test_sched_chain_step_never_waits_behind_another_task_while_a_worker_starts(method, tmp_path):
    # The case above, with the second worker certainly still starting: it was just replaced
    # and its worker_init takes 3 s. The chain's first task takes 50 ms (a pool that sends work
    # ahead to a worker that is "on time" sees a 50 ms task as on time). The touch must wait for
    # the new worker (about 3 s), not go behind the step on the running one (10 s, then False).
    flag, path = str(tmp_path / "flag"), str(tmp_path / "file")
    with TaskManager(2, context=method, worker_init=Task(sched_init_slow_if, flag, 3.0)) as tm:
        open(flag, "w").close()
        [death] = bounded(lambda: tm.execute([Task(kill_self, str(tmp_path / "pid"))], progress=False), 60)
        assert "ChildProcessError" in death, death
        tasks = [TaskChain(Task(sched_nap, 0.05, path), next_task=sched_then_wait_for_the_tagged_file),
                 Task(sched_touch, path)]
        results, seconds = sched_timed(lambda: bounded(lambda: tm.execute(tasks, progress=False), 60))
    assert results == [True, "touched"], \
        "the step waited behind the touch for %.2f s: %r" % (seconds, results)


def test_sched_tiny_calls_mixed_with_one_second_calls_in_both_orders(method, tmp_path):
    # The issue's case: 2,000 tiny calls and 4 calls of 1 s on 2 workers, ideal 2.0 s (two 1 s
    # calls per worker, the tiny ones in between). Then the reverse order on the same manager,
    # the slow function now measured once. Batched with tiny ones, two 1 s calls can land on one
    # worker behind a third: 3.0 s (2.2.0: in about half the tries, either order).
    tiny = [Task(sched_identity, i) for i in range(2000)]
    slow = [Task(time.sleep, 1.0)] * 4
    expected = list(range(2000)) + [None] * 4

    def attempt():
        tm = sched_ready_manager(method, tmp_path)
        try:
            forward, t_forward = sched_timed(lambda: tm.execute(tiny + slow, progress=False))
            backward, t_backward = sched_timed(lambda: tm.execute(slow + tiny, progress=False))
        finally:
            tm.stop()
        assert forward == expected and backward == expected[2000:] + expected[:2000]
        return {"tiny then slow": t_forward, "then slow then tiny": t_backward}

    sched_within("execute(2000 tiny + 4 x 1 s) on 2 workers", 2.0, attempt)


def test_sched_a_function_never_measured_travels_alone(method, tmp_path):
    # Two 1 s calls of a function never measured, in the middle of 2,000 tiny calls of another:
    # ideal 1.0 s (one on each worker). Batched like the tiny calls around them, both travel in
    # one message and run one after the other on one worker: 2.0 s.
    tasks = ([Task(sched_identity, i) for i in range(1000)] + [Task(sched_nap, 1.0, k) for k in range(2)]
             + [Task(sched_identity, i) for i in range(1000)])

    def attempt():
        tm = sched_ready_manager(method, tmp_path)
        try:
            results, seconds = sched_timed(lambda: tm.execute(tasks, progress=False))
        finally:
            tm.stop()
        assert results[:1000] == results[1002:] == list(range(1000))
        return {"1 s calls on pids %s" % sorted(pid for _, pid in results[1000:1002]): seconds}

    sched_within("two 1 s calls of a new function among 2000 tiny ones", 1.0, attempt)


def test_sched_a_chain_step_is_never_batched(method, tmp_path):
    # sched_nap is measured as tiny (2,000 calls of sched_nap(0)); two chains end with a 1 s
    # step of it. The steps come up together, ahead of a long queue of tiny tasks: batched
    # (with each other and tiny tasks), they run one after the other on one worker, 2.0 s; each
    # alone, they run side by side: ideal 1.0 s.
    tasks = ([Task(sched_nap, 0, i) for i in range(1000)]
             + [TaskChain(Task(sched_nap, 0, "chain-%d" % k), sched_then_nap_1s) for k in range(2)]
             + [Task(sched_nap, 0, i) for i in range(1000)])

    def attempt():
        tm = sched_ready_manager(method, tmp_path)
        try:
            results, seconds = sched_timed(lambda: tm.execute(tasks, progress=False))
        finally:
            tm.stop()
        assert [tag for tag, _ in results[:1000] + results[1002:]] == list(range(1000)) * 2
        assert [tag[0] for tag, _ in results[1000:1002]] == ["chain-0", "chain-1"]
        return {"steps on pids %s" % sorted(pid for _, pid in results[1000:1002]): seconds}

    sched_within("two 1 s chain steps of a function measured as tiny", 1.0, attempt)


def test_sched_calls_of_a_tiny_function_spread_over_free_workers(method, tmp_path):
    # meet_where is measured as tiny (2,000 calls), then two calls on 2 idle workers wait for
    # each other: each worker must get one. Sent in one message (a batch of a tiny function),
    # they run one after the other and the first gives up after 10 s: one place, not two.
    with TaskManager(2, context=method) as tm:
        for round_ in range(3):  # measured as tiny again each round: a meeting takes its time
            tiny = str(tmp_path / ("tiny-%d" % round_))
            os.mkdir(tiny)
            assert len(tm.map(meet_where, [tiny] * 2000)) == 2000
            folder = tmp_path / ("meet-%d" % round_)
            folder.mkdir()
            places = bounded(lambda: tm.execute([Task(meet_where, str(folder), 2)] * 2, progress=False), 60)
            assert len(set(places)) == 2, "round %d: both calls ran at %s" % (round_, places)


def sched_story(stamps, t0):
    return ", ".join("%s on pid %d at %.2f s" % (v, pid, t - t0) for v, pid, t in stamps)


def test_sched_no_task_waits_behind_a_busy_worker_while_another_is_free(method, tmp_path):
    # Shown by order, not time: a task held behind a gated one comes back only after the gate,
    # which opens by itself after 10 s if the test doesn't open it first. The gated functions
    # are never measured when they run: a worker running one is not known to be "on time".
    with TaskManager(2, context=method) as tm:
        # 1. Fresh pool, workers still starting: the short task waits for the second worker, not
        #    behind the gated one on the first.
        gate = str(tmp_path / "gate-1")
        timer = open_gate_later(gate, 10)
        try:
            t0 = time.monotonic()
            tm.submit(Task(sched_gated_first, gate, "gated"))
            tm.submit(Task(sched_stamp, "short"))
            got = [bounded(lambda: tm.take(timeout=None), 60)]
            open(gate, "w").close()
            got.append(bounded(lambda: tm.take(timeout=None), 60))
        finally:
            timer.cancel()
        assert [v for v, _, _ in got] == ["short", "gated"], "workers starting: " + sched_story(got, t0)
        # 2. Warm pool, the tiny function measured: a 0.5 s task, a gated one, then a tiny one.
        #    Both workers are busy; the first frees up in 0.5 s and takes the tiny task. Sent
        #    ahead to the worker of the gated task, it would wait there while the other is free.
        assert [v for v, _, _ in tm.map(sched_stamp, range(2000))] == list(range(2000))
        gate = str(tmp_path / "gate-2")
        timer = open_gate_later(gate, 10)
        try:
            t0 = time.monotonic()
            tm.submit(Task(sched_busy, 0.5, "busy"))
            tm.submit(Task(sched_gated_second, gate, "gated"))
            tm.submit(Task(sched_stamp, "short"))
            got = [bounded(lambda: tm.take(timeout=None), 60) for _ in range(2)]
            open(gate, "w").close()
            got.append(bounded(lambda: tm.take(timeout=None), 60))
        finally:
            timer.cancel()
        assert got[2][0] == "gated", "warm pool: " + sched_story(got, t0)
        assert tm.open_tasks == 0


def test_sched_executor_no_future_waits_behind_a_busy_worker_while_another_is_free(method, tmp_path):
    # As above, through mplite.ProcessPoolExecutor.submit: the short future is done while the
    # gated one is not.
    with make_executor(2, method) as ex:
        gate = str(tmp_path / "gate-1")
        timer = open_gate_later(gate, 10)
        try:
            t0 = time.monotonic()
            gated = ex.submit(sched_gated_first, gate, "gated")
            short = ex.submit(sched_stamp, "short")
            done, _ = concurrent.futures.wait([gated, short], timeout=60, return_when=FIRST_COMPLETED)
            short_first = short in done and gated not in done
            open(gate, "w").close()
            got = [f.result(timeout=60) for f in (gated, short)]
        finally:
            timer.cancel()
        assert short_first, "workers starting: the short future waited behind the gated one: " + sched_story(got, t0)
        assert [v for v, _, _ in ex.map(sched_stamp, range(2000))] == list(range(2000))
        gate = str(tmp_path / "gate-2")
        timer = open_gate_later(gate, 10)
        try:
            t0 = time.monotonic()
            busy = ex.submit(sched_busy, 0.5, "busy")
            gated = ex.submit(sched_gated_second, gate, "gated")
            short = ex.submit(sched_stamp, "short")
            done, _ = concurrent.futures.wait([gated, short], timeout=60, return_when=FIRST_COMPLETED)
            short_first = short in done and gated not in done
            open(gate, "w").close()
            got = [f.result(timeout=60) for f in (busy, gated, short)]
        finally:
            timer.cancel()
        assert short_first, "warm pool: the short future waited behind the gated one: " + sched_story(got, t0)


def sched_submit_all(ex, calls):
    """Submit fn(*args) for each (fn, *args) of calls; wait (bounded) for all; their results."""
    fs = [ex.submit(fn, *args) for fn, *args in calls]
    done, not_done = concurrent.futures.wait(fs, timeout=60)
    assert not not_done
    return [f.result() for f in fs]


def test_sched_executor_tiny_futures_mixed_with_one_second_futures_in_both_orders(method, tmp_path):
    # The issue's mix through mplite.ProcessPoolExecutor.submit, in both orders (ideal 2.0 s),
    # then a map of four 1 s calls of a function never measured (ideal 2.0 s).
    tiny = [(sched_identity, i) for i in range(2000)]
    slow = [(time.sleep, 1.0)] * 4

    def attempt():
        ex = sched_ready_executor(method, tmp_path)
        try:
            _, t_forward = sched_timed(lambda: sched_submit_all(ex, tiny + slow))
            _, t_backward = sched_timed(lambda: sched_submit_all(ex, slow + tiny))
            _, t_map = sched_timed(lambda: list(ex.map(sched_nap, [1.0] * 4)))
        finally:
            ex.shutdown(wait=True)
        return {"tiny then slow": t_forward, "then slow then tiny": t_backward, "then map of 4 x 1 s": t_map}

    sched_within("2000 tiny + 4 x 1 s futures on 2 workers", 2.0, attempt)


def test_sched_executor_a_function_never_measured_travels_alone(method, tmp_path):
    # Two 1 s futures of a new function among 2,000 tiny ones: ideal 1.0 s.
    calls = ([(sched_identity, i) for i in range(1000)] + [(sched_nap, 1.0, k) for k in range(2)]
             + [(sched_identity, i) for i in range(1000)])

    def attempt():
        ex = sched_ready_executor(method, tmp_path)
        try:
            results, seconds = sched_timed(lambda: sched_submit_all(ex, calls))
        finally:
            ex.shutdown(wait=True)
        return {"1 s calls on pids %s" % sorted(pid for _, pid in results[1000:1002]): seconds}

    sched_within("two 1 s futures of a new function among 2000 tiny ones", 1.0, attempt)


@pytest.mark.xfail(strict=False, reason="moonshot of issue 15: work stealing from a sent batch is not implemented")
@pytest.mark.parametrize("front", ["execute", "executor.map"])
def test_sched_moonshot_a_batch_holding_a_long_task_gives_up_the_rest(front, method, tmp_path):
    # 4,000 calls of one function (measured tiny), two adjacent ones sleep 1 s: ideal 1.0 s,
    # if the tasks behind the first long one in its batch go to the idle worker. 2.0 s today.
    slow = frozenset((2000, 2001))

    def attempt():
        if front == "execute":
            tm = sched_ready_manager(method, tmp_path)
            try:
                results, seconds = sched_timed(
                    lambda: tm.execute([Task(sched_nap_at, i, slow) for i in range(4000)], progress=False))
            finally:
                tm.stop()
        else:
            ex = sched_ready_executor(method, tmp_path)
            try:
                results, seconds = sched_timed(lambda: list(ex.map(sched_nap_at, range(4000), [slow] * 4000)))
            finally:
                ex.shutdown(wait=True)
        assert results == list(range(4000))
        return {front: seconds}

    sched_within("4000 calls, two adjacent ones of 1 s", 1.0, attempt)


# ---------------------------------------------------------------------------------------------
# Papercuts (issue 15, item 7)
# ---------------------------------------------------------------------------------------------

def test_sched_papercut_context_none_is_the_default_start_method():
    # None means the default, spawn, as mp_context=None does for the executor: a spawned worker
    # is this process's child (a forkserver's is not) and doesn't see the parent's globals (a
    # forked one does).
    global SCHED_PARENT_MARK
    SCHED_PARENT_MARK = "set in the parent"
    try:
        with TaskManager(1, context=None) as tm:
            [(mark, ppid)] = tm.execute([Task(sched_worker_identity)], progress=False)
    finally:
        SCHED_PARENT_MARK = None
    assert (mark, ppid) == (None, os.getpid())


def test_sched_papercut_progress_bar_last_line_is_written_once_in_a_log(spool, capsys):
    # Not a terminal (capsys's stderr): the bar writes whole lines, at growing intervals. A
    # call longer than the first interval ends with an update that draws the last line;
    # closing the bar must not write that line again.
    spool.execute([Task(sleep_return, 0.01, 0)], progress=False)
    assert spool.execute([Task(sleep_return, 5.5, 1), Task(sleep_return, 0.1, 2)]) == [1, 2]
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip()]
    final = [line for line in lines if re.search(r"100%\|[^|]*\| 2/2 ", line)]
    assert len(final) == 1, "the last line was written %d times:\n%s" % (len(final), err)
    assert lines[-1] == final[0], err


def test_sched_papercut_broken_pool_traceback_shows_the_caller_start(method, tmp_path):
    # start() with a worker_init that fails: the error is made where the engine reads the
    # worker's answer; raised in start(), it shows start()'s caller, not the engine's loop.
    caller = inspect.currentframe()
    tm = TaskManager(2, context=method, worker_init=Task(sched_init_unless, str(tmp_path), "init-boom-8812"))
    try:
        with _fault_deadline(60, "start() with a failing worker_init"):
            with pytest.raises(RuntimeError) as excinfo:
                tm.start()
        sched_assert_callers_traceback(excinfo.value, caller, "init-boom-8812", "ValueError")
    finally:
        tm.stop()
        del caller


def test_sched_papercut_broken_pool_traceback_shows_the_caller_execute(method, tmp_path):
    # An execute waiting when a replacement worker's init fails, then an execute after.
    caller = inspect.currentframe()
    flag = str(tmp_path / "flag")
    tm = TaskManager(2, context=method, worker_init=Task(sched_init_unless, flag, "init-boom-8813"))
    try:
        with _fault_deadline(60, "start()"):
            tm.start()
        open(flag, "w").close()
        with _fault_deadline(60, "execute while the replacement worker's init fails"):
            with pytest.raises(BrokenProcessPool) as excinfo:
                tm.execute([Task(kill_self, str(tmp_path / "pid")), Task(wait_for_file, flag + "-never", 0, 30)],
                           progress=False)
        sched_assert_callers_traceback(excinfo.value, caller, "init-boom-8813")
        with _fault_deadline(60, "execute on the broken pool"):
            with pytest.raises(BrokenProcessPool) as excinfo:
                tm.execute([Task(adder, 1, 2)], progress=False)
        sched_assert_callers_traceback(excinfo.value, caller, "init-boom-8813")
    finally:
        tm.stop()
        del caller


def test_sched_papercut_broken_pool_traceback_shows_the_caller_future_result(method, tmp_path):
    # The initializer fails 0.5 s in: the future is submitted before the pool breaks, and
    # result() raises the BrokenProcessPool the engine set on it.
    caller = inspect.currentframe()
    ex = make_executor(2, method, initializer=sched_init_unless, initargs=(str(tmp_path), "init-boom-8814", 0.5))
    try:
        future = ex.submit(adder, 1, 2)
        with _fault_deadline(60, "result() of a future of a broken executor"):
            with pytest.raises(BrokenProcessPool) as excinfo:
                future.result(timeout=50)
        sched_assert_callers_traceback(excinfo.value, caller, "init-boom-8814")
        wait_until(lambda: ex._broken, 30, "the executor is marked broken")
        with pytest.raises(BrokenProcessPool) as excinfo:
            ex.submit(adder, 1, 2)
        sched_assert_callers_traceback(excinfo.value, caller, "init-boom-8814")
    finally:
        bounded(lambda: ex.shutdown(wait=True), 60)
        del caller


# ---------------------------------------------------------------------------------------------
# Thread safety of the engine, whichever thread runs it (issue 15, item 4)
# ---------------------------------------------------------------------------------------------

def test_sched_threads_submit_take_round_trips_with_executes_and_a_blocked_caller(method, tmp_path):
    # 8 threads of sequential submit + take round trips, 2 threads of execute/map, and one
    # thread blocked for the whole time in an execute waiting on a gate (the others' results
    # must move while it waits). take() serves any submitted result: every one must come out
    # exactly once, across all the threads.
    n_threads, n_trips = 8, 150
    taken, lock = [], threading.Lock()
    gate = tmp_path / "gate"
    countdown = SchedCountdown(n_threads + 2, gate)

    with TaskManager(2, context=method) as tm:
        def round_trips(tid):
            try:
                for i in range(n_trips):
                    tm.submit(Task(sched_tag, tid, i))
                    got = tm.take(timeout=None)
                    assert got is not None, "take(timeout=None) returned None with tasks open"
                    with lock:
                        taken.append(got[:2])
            finally:
                countdown.done()

        def executes(tid):
            try:
                for i in range(15):
                    js = range(i * 10, i * 10 + 10)
                    results = tm.execute([Task(sched_tag, tid, j) for j in js], progress=False)
                    assert [r[:2] for r in results] == [(tid, j) for j in js]
                    assert tm.map(double, range(i, i + 20)) == [2 * x for x in range(i, i + 20)]
            finally:
                countdown.done()

        def blocked():
            assert tm.execute([Task(wait_for_file, str(gate), "opened", 80)], progress=False) == ["opened"]
            assert gate.exists()

        targets = ([functools.partial(round_trips, t) for t in range(n_threads)]
                   + [functools.partial(executes, "x%d" % t) for t in range(2)] + [blocked])
        try:
            run_threads(targets, limit=90)
        finally:
            countdown.cancel()
        assert sorted(taken) == sorted((t, i) for t in range(n_threads) for i in range(n_trips))
        assert tm.open_tasks == 0 and tm.take() is None


def test_sched_threads_executor_submit_result_and_map_with_a_blocked_caller(method, tmp_path):
    n_threads, n_trips = 8, 150
    gate = tmp_path / "gate"
    countdown = SchedCountdown(n_threads + 2, gate)

    with make_executor(2, method) as ex:
        def round_trips(tid):
            try:
                for i in range(n_trips):
                    assert ex.submit(sched_tag, tid, i).result(timeout=60)[:2] == (tid, i)
            finally:
                countdown.done()

        def maps(tid):
            try:
                for i in range(15):
                    assert list(ex.map(adder, range(i, i + 30), [tid] * 30, timeout=60)) == \
                        [x + tid for x in range(i, i + 30)]
            finally:
                countdown.done()

        def blocked():
            assert ex.submit(wait_for_file, str(gate), "opened", 80).result(timeout=85) == "opened"
            assert gate.exists()

        targets = ([functools.partial(round_trips, t) for t in range(n_threads)]
                   + [functools.partial(maps, 1000 * t) for t in range(1, 3)] + [blocked])
        try:
            run_threads(targets, limit=90)
        finally:
            countdown.cancel()


def test_sched_threads_a_timed_out_wait_returns_promptly_while_another_thread_waits(method, tmp_path):
    # A caller whose wait times out must return at once even while it is the one moving the
    # engine, and the thread waiting next to it must still get its results. Bound: 2 s for a
    # 0.1 s timeout (a doubling would be 0.2 s: this bound only catches a wait that hangs on to
    # the engine until other work is done).
    gate = str(tmp_path / "gate")
    timer = open_gate_later(gate, 60)
    def waits_time_out_while_another_thread_works(timed_wait, other_call, what):
        """timed_wait() five times, each a wait of 0.1 s that times out, while another thread
        keeps calling other_call(i) == i through the same pool: both must go on."""
        stop, other_done = threading.Event(), []

        def other_waiter():
            i = 0
            try:
                while not stop.is_set():
                    assert other_call(i) == i
                    i += 1
                other_done.append(i)
            except BaseException as exc:  # shown by the test's thread
                other_done.append(exc)

        thread = threading.Thread(target=other_waiter, daemon=True)
        thread.start()
        try:
            for _ in range(5):
                start = time.monotonic()
                timed_wait()
                seconds = time.monotonic() - start
                assert seconds < 2.0, "%s took %.2f s" % (what, seconds)
        finally:
            stop.set()
            thread.join(60)
        assert not thread.is_alive() and other_done and not isinstance(other_done[0], BaseException) \
            and other_done[0] > 0, other_done

    def result_times_out():
        with pytest.raises(concurrent.futures.TimeoutError):
            long.result(timeout=0.1)

    try:
        with make_executor(2, method) as ex:
            long = ex.submit(wait_for_file, gate, "long", 60)
            waits_time_out_while_another_thread_works(
                result_times_out, lambda i: ex.submit(sched_identity, i).result(timeout=30), "result(timeout=0.1)")
            open(gate, "w").close()
            assert long.result(timeout=60) == "long"
        with TaskManager(2, context=method) as tm:
            tm.submit(Task(wait_for_file, gate + "-tm", "long", 60))

            def take_times_out():
                assert tm.take(timeout=0.1) is None

            waits_time_out_while_another_thread_works(
                take_times_out, lambda i: tm.execute([Task(sched_identity, i)], progress=False)[0], "take(timeout=0.1)")
            open(gate + "-tm", "w").close()
            assert bounded(lambda: tm.take(timeout=None), 60) == "long"
    finally:
        timer.cancel()


@pytest.mark.parametrize("step", [sched_then_execute, sched_then_map, sched_then_take])
def test_sched_threads_next_task_that_waits_on_its_manager_raises_not_hangs(step, method):
    # next_task runs wherever the engine runs (its thread, or a caller's): it can't wait for
    # results there. Documented: RuntimeError, that task's error; the rest of the call goes on.
    # execute and map always wait (for their own new task): called from 3 threads at once, so
    # that the step may run on another caller's thread. take(timeout=None) waits only while a
    # submitted task is open and none is ready: the chain's own submission, still running.
    with TaskManager(2, context=method) as tm:
        SCHED_NESTED.append(tm)
        try:
            def call(k):
                results = tm.execute([TaskChain(Task(adder, k, 2), step), Task(adder, k, 3)], progress=False)
                last = results[0].splitlines()[-1] if isinstance(results[0], str) else repr(results[0])
                assert re.search(r"RuntimeError: .*(can't|cannot|can not) wait", last), results[0]
                assert results[1] == k + 3

            if step is not sched_then_take:
                run_threads([functools.partial(call, k) for k in range(3)], limit=60)
            tm.submit(TaskChain(Task(adder, 1, 2), step))
            text = bounded(lambda: tm.take(timeout=None), 60)
            assert isinstance(text, str), text
            assert re.search(r"RuntimeError: .*(can't|cannot|can not) wait", text.splitlines()[-1]), text
            assert tm.open_tasks == 0
            assert tm.execute([Task(adder, 1, 1)], progress=False) == [2]  # the engine went on
        finally:
            SCHED_NESTED.clear()


def test_sched_threads_next_task_and_done_callbacks_may_submit_more_work(method):
    # What runs where the engine runs may hand it more work without waiting: no deadlock on the
    # engine's own lock, wherever that is.
    with TaskManager(2, context=method) as tm:
        SCHED_NESTED.append(tm)
        try:
            results = bounded(lambda: tm.execute([TaskChain(Task(adder, 1, 2), sched_then_submit)]
                                                 + [Task(adder, k, 0) for k in range(50)], progress=False), 60)
            assert results == [3] + list(range(50))
            assert bounded(lambda: tm.take(timeout=None), 60) == 103
            assert tm.open_tasks == 0
        finally:
            SCHED_NESTED.clear()
    with make_executor(2, method) as ex:
        more = []
        first = ex.submit(adder, 1, 2)
        first.add_done_callback(lambda f: more.append(ex.submit(adder, f.result(), 10)))
        assert first.result(timeout=60) == 3
        wait_until(lambda: more, 30, "the done-callback ran")
        assert more[0].result(timeout=60) == 13
        futures_ = [ex.submit(adder, k, 0) for k in range(20)]
        for k, f in enumerate(futures_):
            f.add_done_callback(lambda f, k=k: more.append(ex.submit(adder, k, 1000)))
        assert [f.result(timeout=60) for f in futures_] == list(range(20))
        wait_until(lambda: len(more) == 21, 30, "every done-callback ran")
        assert sorted(f.result(timeout=60) for f in more[1:]) == [k + 1000 for k in range(20)]
