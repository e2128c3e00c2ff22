"""Tests of mplite's core API, through the public API only: real processes, real pipes, no mocks.

Functions used as tasks live at module level: spawn and forkserver workers import this file as the
module ``test_mplite`` (pytest puts its folder on sys.path, which the workers inherit; a test checks it).
Every test runs under a watchdog, so a hang ends the run with tracebacks instead of blocking CI.
"""
import ast
import faulthandler
import functools
import inspect
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import pytest

import mplite
from mplite import Task, TaskChain, TaskManager

METHODS = ["spawn", "fork", "forkserver"]
WATCHDOG_S = 120  # per test; far above what any test needs, only there to turn a hang into a failure


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


def pid_running(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


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
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendant_processes(root=None):
    """[(pid, state, cmdline)] of every descendant of root (default: this process) found via
    /proc/*/stat, zombies included, the multiprocessing singletons above excluded."""
    root = os.getpid() if root is None else root
    children, states = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        states[int(name)] = fields[0]
        children.setdefault(int(fields[1]), []).append(int(name))
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
    """After this module (all its managers stopped), no worker of ours may be left behind."""
    yield
    deadline = time.monotonic() + 15  # stopped workers may take a moment to be reaped
    while (multiprocessing.active_children() or descendant_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert multiprocessing.active_children() == []
    assert descendant_processes() == []


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
    assert mplite.__version__ == "2.0.0"
    assert mplite.__all__ == ["Task", "TaskChain", "TaskManager"]


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
    outside = sorted(m for m in imported if m.split(".")[0] not in sys.stdlib_module_names)
    assert imported and outside == []


def test_python_m_mplite_self_test_exits_0(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(mplite.__file__)))
    proc = subprocess.run([sys.executable, "-m", "mplite"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=110)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-3000:]


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
    n = len(os.sched_getaffinity(0))
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


@pytest.mark.parametrize("method_name", ["fork", "spawn"])
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
    TaskManager(1, "fork", Task(adder, 1, 2), "exception", timeout=2.5, max_tasks_per_child=1)


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------

def test_nothing_starts_in_init():
    before = {p for p, _, _ in descendant_processes()}
    TaskManager(2, context="fork")
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
    tm = TaskManager(2, context="fork")
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
    with TaskManager(1, context="fork") as tm:
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
    def local_function():
        return 1

    gate = str(tmp_path / "gate")
    queued = Task(wait_for_file, gate, "queued")
    pool.submit(queued)
    bad_tasks = [(Task(lambda: 1), "<lambda>"), (Task(local_function), "local_function"),
                 (Task(adder, threading.Lock(), 1), "adder")]
    for bad, name in bad_tasks:
        with pytest.raises(TypeError) as info:
            pool.submit(bad)
        assert isinstance(info.value, pickle.PicklingError)
        assert name in str(info.value)
    with pytest.raises(TypeError) as info:
        pool.execute([Task(adder, 1, 2), Task(lambda: 2)], progress=False)
    assert isinstance(info.value, pickle.PicklingError) and "<lambda>" in str(info.value)
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
