#!/usr/bin/env python3
"""Benchmark mplite against the standard library's process pools (and peers, when installed).

Usage
-----
    python benchmarks/bench.py                        # the full run: ~35 minutes on 2 cores,
                                                      # most of it the 1,000,000-task runs and W7
    python benchmarks/bench.py --out benchmarks/results/bench.md   # also write the Markdown there
    python benchmarks/bench.py --methods spawn --repeat 5 --workers 4
    python benchmarks/bench.py --only mplite,Pool.starmap --workloads W1,W6 --sizes 20000
                                                      # a quick subset (W1 + W6, no 1M runs)
    python benchmarks/bench.py --workloads W1,W1a --sizes 20000        # tiny tasks, no 1M runs
    python benchmarks/bench.py --workers 2,4,8,16 --workloads W1,W6    # a sweep, + summary table
    python benchmarks/bench.py --workloads W7 --only mplite.imap       # imap memory (~1 min/run)
    python benchmarks/bench.py --workloads W6,W8      # latency against its floor, and makespans
    python benchmarks/bench.py --mplite1-path DIR     # add mplite 1.3.x (or set MPLITE1_PATH=DIR)
    python benchmarks/bench.py --baseline-path DIR    # add another mplite.py, e.g. the last release

mplite 1.3.x is also called ``mplite``, so it cannot be imported beside this repository's
mplite.py: install it into a throw-away folder and point --mplite1-path at it, e.g.
``pip install --target /tmp/mplite1 mplite==1.3.1 tqdm tblib``. The folder is put first on
sys.path for that contender's runs only. joblib, loky, pebble and mpire are measured when
importable (e.g. via PYTHONPATH, or by running this script with a virtualenv's python); the
script needs none of them and says which were skipped. Standard library only, Python 3.8+.

How it measures
---------------
Every (contender, workload, size, start method, worker count, repeat) runs in a fresh
interpreter: the script re-invokes itself as ``bench.py --child CONTENDER WORKLOAD ...`` and the
child prints one JSON line with what it measured (wall time; for W2/W3 also the tasks' CPU
times; its own peak RSS). Task functions live in this module, so spawn workers find them as
``__main__.<name>``. Runs are interleaved (repeat -> workers -> method -> workload -> size ->
contender); the tables show the median of each cell's runs. All pools get the same worker
count (--workers) and start method (--methods) where the library allows it. Except in W4 and
W8a, the pool is started and warmed up (each worker has run a task) before the clock starts,
and stopped after it stops.

  workload         what                                         metric (better when)
  W1 tiny tasks,   adder(i, 1) for i in range(n), n = 20,000    tasks/s (higher); at the largest
     2 arguments   and 1,000,000 (--sizes); the calls are       size also the peak RSS of the
                   built inside the timing, as a user writes    parent (lower)
                   them: [Task(adder, i, 1) for i in ...],
                   [(i, 1) for i in ...] for starmap
  W1a tiny tasks,  inc(x), which returns x + 1, over a list     as W1
     1 argument    xs = list(range(n)) built before the clock
  W2 uniform CPU   40 x 50 ms pure-Python CPU*                  parallel efficiency (higher)
                                                                = serial time / (workers x wall)*
  W3 skewed CPU    56 x 10 ms, then 4 x 400 ms CPU* (long last) makespan / ideal (lower), ideal
                                                                = max(serial total / workers,
                                                                      longest task)*
  W4 start-up      create the pool, run one task, stop it       seconds (lower)
  W5 payload       16 x a 16 MiB bytes argument, echoed back    MB/s both ways (higher)
                                                                = 2 x 16 x 16 MiB / wall
  W6 latency       500 sequential round trips (submit one task, us per trip (lower); also
                   wait for its result)                         as a multiple of the stdlib
                                                                ProcessPoolExecutor's and of
                                                                the Pipe floor's (lower)
  W7 imap stream   for r in tm.imap(inc, (i for i in range(N))) tasks/s and peak RSS of the
                   with N = 10,000,000 (--imap-items), results  parent (lower); ~20-60 s a run
                   checked and dropped as they come
  W8 makespan      four cases with known ideal makespans (the   seconds, and seconds / ideal
                   ideals below: on 2 workers); mplite, and     (lower); W8a: also how many
                   Pool.map for d:                              runs saw the file
                   a  tm.execute([TaskChain(Task(identity, path), next_task=<returns
                      Task(wait_for_file, path, 10.0)>), Task(touch, path)]) on a fresh
                      TaskManager, its start() inside the timing (the workers boot inside it
                      either way: start() returns before they are up). wait_for_file polls
                      for the file up to 10 s and returns whether it came. Ideal ~0 s plus
                      start-up; ~10 s and False if the touch waits behind the chain's step
                   b  tm.execute([Task(identity, i) for i in range(2000)]
                                 + [Task(time.sleep, 1.0)] * 4): ideal 2 s
                   c  the same list reversed (sleeps first), right after b on the same pool:
                      ideal 2 s
                   d  tm.map(slow_pair, range(4000)) / pool.map(...): slow_pair(i) sleeps 1 s
                      for i = 1000 and 1001 (adjacent), else returns i: ideal ~1 s
                   b, c and d share one pool, started and warmed up outside the timing.

W1-1M and W1a-1M below mean W1 and W1a at 1,000,000 tasks. The parent's peak RSS is the child
benchmark process's own high-water mark (getrusage(RUSAGE_SELF).ru_maxrss; workers are other
processes and not in it). It includes the interpreter, the imported pool library and the
started pool: that baseline, the high-water mark right before the clock starts, is shown beside
it. Contenders that send one task per message (chunksize=1: ProcessPoolExecutor, Pool.imap,
loky, pebble) run W1/W1a only up to 100,000 tasks: at 1,000,000 they would take minutes per
run; their cells read "skipped".

* A CPU task is a pure-Python loop that runs until its own thread has used that many ms of CPU
(time.thread_time), and reports the CPU seconds it used. Serial time, serial total and longest
task are those reported CPU seconds, from the same run. A loop count calibrated up front, or a
wall-clock serial baseline from a separate run, would not do: on shared or virtual machines the
speed of the same loop drifts by 2-3x within minutes (seen on the 2-core machine this was
written on), while CPU seconds drift with it, so the ratios stay honest. Whatever takes CPU
from the workers (the parent's own overhead, or other load on the machine) lowers efficiency.
The serial loop is the floor for W1/W1a only (in W2/W3 it would score 1 / workers and
`workers`, by definition); it has no pool, so one set of its runs serves every start method
and worker count.

Contenders (the W1/W1a, W6 and W8 tables show each one's exact call): serial loop; multiprocessing.Pool
(``map`` and ``starmap``, default chunksize; ``imap``, chunksize=1; W4/W6 use one Pool,
``apply_async().get()`` for W6, so they are shown once under Pool.map; Pool.map is W8d's
stdlib reference); concurrent.futures.ProcessPoolExecutor (``map`` chunksize=1,
``submit().result()``); the Pipe floor (W6 only: no pool, one child process at the other end of
a ``multiprocessing.Pipe`` that receives ``(adder, i)`` pickled, as the pools send a task, and
sends back ``adder(i)``: the least a round trip can cost); mplite (``execute`` with Task
objects, ``submit`` + ``take(timeout=None)``, W8), ``tm.map``, ``tm.imap``
(W1a, W7; "n/a (no imap)" for an mplite without it); mplite's ProcessPoolExecutor (``map``,
``submit().result()``); mplite with W1's task written as a lambda (it travels by value);
optional: another mplite.py given by --baseline-path (as mplite); mplite 1.3.x (``execute``
with a silent pbar; W6 polls the non-blocking ``take()``); joblib
(``Parallel(n_jobs=workers, backend="loky")(delayed(f)(...) ...)``, inside ``with Parallel``
so its workers are reused; W1, W1a, W2, W3; joblib always uses loky's own start method, which
launches a fresh interpreter like spawn, and the table says so); loky
(``get_reusable_executor``, which refuses 'fork': it gets loky's own start method there);
pebble (``ProcessPool``); mpire (``WorkerPool``, keep_alive=True; it unpacks argument tuples).

Call shapes: W1 compares two-argument calls (Pool.starmap, execute with Task(adder, i, 1),
executor.map over two iterables, joblib's delayed(adder)(i, 1)); W1a compares one-argument
calls (Pool.map, tm.map, tm.imap, executor.map over one iterable). The "best stdlib pool" of a
workload (and size) is the best of the standard library's pools for that metric and shape
(Pool.map, Pool.starmap, Pool.imap, ProcessPoolExecutor; in bold). Every pool cell also shows
its performance relative to it: (1.25x) means 1.25 times as good, whichever direction the metric
runs (value / best for higher-is-better metrics, best / value for lower-is-better ones).

With several worker counts (--workers 2,4,8,16) every table is repeated per worker count, and
a sweep summary shows W1/W1a (smallest size) tasks/s and W6 latency per contender and worker
count. A "Targets" table checks the goals of issue 8 (2 workers) against the medians, and W6's:
each mplite front door (TaskManager submit + take, ProcessPoolExecutor.submit().result()) at
<= 0.5x the stdlib ProcessPoolExecutor's time per trip, and (moonshot) <= 2x the Pipe floor's.
The exit status is 1 if any run failed (its cell then reads "error").
"""

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPT = os.path.abspath(__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(SCRIPT))

W1_SIZES = (20000, 1000000)
ONE_PER_MESSAGE_MAX = 100000  # W1/W1a size limit for contenders sending one task per message
W2_TASKS, W2_MS = 40, 50
W3_SHORT, W3_SHORT_MS, W3_LONG, W3_LONG_MS = 56, 10, 4, 400
W5_TASKS, W5_BYTES = 16, 16 * 1024 * 1024
W6_TRIPS = 500
W7_ITEMS = 10000000
W8_WAIT = 10.0  # W8a: how long the chain's step waits for the file
W8_TINY, W8_SLEEPS, W8_SLEEP = 2000, 4, 1.0  # W8b/W8c
W8_CALLS, W8_SLOW = 4000, (1000, 1001)  # W8d: f(i) sleeps W8_SLEEP s for these two i
W8_CASES = ("a", "b", "c", "d")


# ----------------------------------------------------------------------------------------------
# Task functions (module level, so every start method can pickle them by reference).

def adder(a, b=1):
    return a + b


def inc(x):
    return x + 1


adder_lambda = lambda a, b=1: a + b  # noqa: E731  a lambda travels by value: W1 measures that


def spin(ms):
    """Pure-Python CPU work until this thread has used `ms` ms of CPU. Returns (ms, CPU seconds)."""
    t0 = time.thread_time()
    end = t0 + ms / 1000
    x = 0
    while time.thread_time() < end:
        for i in range(200):  # ~0.1 ms between clock reads
            x = (x * 31 + i) & 0xFFFF
    return ms, time.thread_time() - t0


def echo(payload):
    return payload


def nap(seconds):
    time.sleep(seconds)
    return os.getpid()


def identity(x):
    return x


def touch(path):
    """W8a: create the file at path."""
    with open(path, "a"):
        pass
    return True


def wait_for_file(path, timeout):
    """W8a: poll for the file at path every ms for up to timeout s; True if it appeared."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def then_wait_for_file(task, path):
    """W8a's next_task (it runs in the parent): wait in a worker for the file at path."""
    return type(task)(wait_for_file, path, W8_WAIT)  # type(task): the mplite under test's Task


def slow_pair(i):
    """W8d: sleeps W8_SLEEP s for the two adjacent inputs in W8_SLOW; returns i."""
    if i in W8_SLOW:
        time.sleep(W8_SLEEP)
    return i


def pipe_serve(conn):
    """The far end of W6's Pipe floor: receive (fn, arg), send back fn(arg); None ends it."""
    while True:
        message = conn.recv()
        if message is None:
            return
        fn, arg = message
        conn.send(fn(arg))


# ----------------------------------------------------------------------------------------------
# Contenders: one small adapter each, with a common interface.

class Adapter:
    """start() / map(fn, xs) -> list / pairs(fn, n) -> list / roundtrip(fn, arg) / stop().

    map is the one-argument shape (fn(x) for x in xs); pairs the two-argument one (fn(i, 1) for
    i in range(n), the calls built inside it as a user writes them). open() returns the
    library's pool as a context manager; start() enters it and stop() exits it, so each pool is
    shut down exactly the way ``with`` would do it. W8 runs the cases in makespan_cases, with
    execute(tasks) (mplite's Task/TaskChain lists) and plain_map(fn, xs) (tm.map, Pool.map).
    """

    label = ""  # "{v}" is replaced by the version found
    stdlib = False
    workloads = ("W2", "W3", "W4", "W5", "W6")
    calls = {}  # "W1"/"W1a" -> the call measured, as shown in the tables
    makespan_cases = ()  # the W8 cases it runs (W8_CASES)
    max_tiny = None  # largest W1/W1a size this contender runs (None: any)
    module = None  # the import that makes it available (None: always available)
    path_option = None  # the option naming the folder it is imported from
    replaced_methods = {}  # start methods the library refuses -> the method it gets instead

    def __init__(self, workers, method):
        self.workers = workers
        self.method = self.replaced_methods.get(method, method)
        self.pool = None
        self._stack = None

    def open(self):
        raise NotImplementedError

    def start(self):
        self._stack = contextlib.ExitStack()
        self.pool = self._stack.enter_context(self.open())

    def stop(self):
        self._stack.close()

    def map(self, fn, args):
        raise NotImplementedError

    def pairs(self, fn, n):
        raise NotImplementedError

    def stream(self, fn, iterable):
        """W7: an iterator of fn(x) for x in iterable, in order."""
        raise NotImplementedError

    def roundtrip(self, fn, arg):
        return self.map(fn, [arg])[0]

    def execute(self, tasks):
        raise NotImplementedError

    def plain_map(self, fn, args):
        """W8d: the library's own one-argument map, with its own defaults (chunking)."""
        raise NotImplementedError

    def warm_up(self):
        """Let every worker run a task before the clock starts."""
        self.map(nap, [0.02] * (2 * self.workers))

    def missing(self):
        """Why this contender can't run here (checked in the child, after the import), or None."""
        return None

    def version(self):
        return ""

    def ctx(self):
        return multiprocessing.get_context(self.method)

    @classmethod
    def method_note(cls, method):
        """The start method it really uses under `method`, where that is another one."""
        return cls.replaced_methods.get(method)


class Serial(Adapter):
    label = "serial loop"
    workloads = ("W1", "W1a")  # W2/W3 would show 1 / workers and `workers`, by definition
    calls = {"W1": "[adder(i, 1) for i in range(n)]", "W1a": "[inc(x) for x in xs]"}

    def open(self):
        return contextlib.nullcontext()

    def warm_up(self):
        pass

    def map(self, fn, args):
        return [fn(a) for a in args]

    def pairs(self, fn, n):
        return [fn(i, 1) for i in range(n)]


class PoolMap(Adapter):
    label = "Pool.map"
    stdlib = True
    workloads = ("W1a", "W2", "W3", "W4", "W5", "W6", "W8")
    calls = {"W1a": "pool.map(inc, xs)", "W6": "pool.apply_async(adder, (i,)).get()",
             "W8": "pool.map(slow_pair, range(4000))"}
    makespan_cases = ("d",)

    def open(self):
        return self.ctx().Pool(self.workers)

    def map(self, fn, args):
        return self.pool.map(fn, args)

    plain_map = map

    def roundtrip(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)).get()


class PoolStarmap(PoolMap):
    label = "Pool.starmap"
    workloads = ("W1",)
    calls = {"W1": "pool.starmap(adder, [(i, 1) for i in range(n)])"}

    def pairs(self, fn, n):
        return self.pool.starmap(fn, _built([(i, 1) for i in range(n)]))


class PoolImap(PoolMap):
    label = "Pool.imap"
    workloads = ("W1a", "W2", "W3", "W5")  # W4 and W6 would measure the same Pool as Pool.map
    calls = {"W1a": "list(pool.imap(inc, xs, chunksize=1))"}
    max_tiny = ONE_PER_MESSAGE_MAX

    def map(self, fn, args):
        return list(self.pool.imap(fn, args, chunksize=1))


class PPE(Adapter):
    label = "ProcessPoolExecutor"
    stdlib = True
    workloads = ("W1", "W1a", "W2", "W3", "W4", "W5", "W6")
    calls = {"W1": "list(ex.map(adder, range(n), [1] * n, chunksize=1))",
             "W1a": "list(ex.map(inc, xs, chunksize=1))", "W6": "ex.submit(adder, i).result()"}
    max_tiny = ONE_PER_MESSAGE_MAX

    def open(self):
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(self.workers, mp_context=self.ctx())

    def map(self, fn, args):
        return list(self.pool.map(fn, args, chunksize=1))

    def pairs(self, fn, n):
        return list(self.pool.map(fn, range(n), [1] * n, chunksize=1))

    def roundtrip(self, fn, arg):
        return self.pool.submit(fn, arg).result()


class PipeFloor(Adapter):
    """W6's floor: no pool, one child process at the other end of a multiprocessing.Pipe.

    Each trip sends (fn, arg), a function reference and an int pickled as the pools send them,
    and receives fn(arg): the least any pool's round trip can cost with this start method."""
    label = "Pipe floor (multiprocessing.Pipe, 1 child)"
    workloads = ("W6",)
    calls = {"W6": "conn.send((adder, i)); conn.recv()"}

    @contextlib.contextmanager
    def open(self):
        ctx = self.ctx()
        here, there = ctx.Pipe()
        child = ctx.Process(target=pipe_serve, args=(there,), daemon=True)
        child.start()
        there.close()
        try:
            yield here
        finally:
            with contextlib.suppress(OSError):
                here.send(None)
            child.join(5)
            if child.is_alive():
                child.terminate()
                child.join()
            here.close()

    def roundtrip(self, fn, arg):
        self.pool.send((fn, arg))
        return self.pool.recv()

    def warm_up(self):
        for i in range(2 * self.workers):
            self.roundtrip(adder, i)


class Mplite(Adapter):
    label = "mplite {v}"
    module = "mplite"
    path_option = "mplite_path"
    workloads = ("W1", "W2", "W3", "W4", "W5", "W6", "W8")
    calls = {"W1": "tm.execute([Task(adder, i, 1) for i in range(n)], progress=False)",
             "W6": "tm.submit(Task(adder, i)); tm.take(timeout=None)",
             "W8": "tm.execute(...) (a, b, c); tm.map(slow_pair, range(4000)) (d)"}
    makespan_cases = W8_CASES

    def open(self):
        import mplite
        self.Task, self.TaskChain = mplite.Task, mplite.TaskChain
        return mplite.TaskManager(cpu_count=self.workers, context=self.method)

    def execute(self, tasks):
        return self.pool.execute(tasks, progress=False)

    def plain_map(self, fn, args):
        return self.pool.map(fn, args)

    def map(self, fn, args):
        return self.pool.execute([self.Task(fn, a) for a in args], progress=False)

    def pairs(self, fn, n):
        Task = self.Task
        return self.pool.execute(_built([Task(fn, i, 1) for i in range(n)]), progress=False)

    def roundtrip(self, fn, arg):
        self.pool.submit(self.Task(fn, arg))
        return self.pool.take(timeout=None)

    def version(self):
        import mplite
        return mplite.__version__


class MpliteMap(Mplite):
    label = "mplite {v} tm.map"
    workloads = ("W1a",)
    calls = {"W1a": "tm.map(inc, xs)"}

    def map(self, fn, args):
        return self.pool.map(fn, args)


class MpliteImap(Mplite):
    label = "mplite {v} tm.imap"
    workloads = ("W1a", "W7")
    calls = {"W1a": "list(tm.imap(inc, xs))"}

    def missing(self):
        import mplite
        return None if hasattr(mplite.TaskManager, "imap") else "no imap"

    def warm_up(self):
        Mplite.map(self, nap, [0.02] * (2 * self.workers))

    def map(self, fn, args):
        return list(self.pool.imap(fn, args))

    def stream(self, fn, iterable):
        return self.pool.imap(fn, iterable)


class MplitePPE(Mplite):
    label = "mplite {v} ProcessPoolExecutor"
    workloads = ("W1", "W1a", "W2", "W3", "W4", "W5", "W6")
    calls = {"W1": "list(ex.map(adder, range(n), [1] * n))", "W1a": "list(ex.map(inc, xs))",
             "W6": "ex.submit(adder, i).result()"}

    def open(self):
        import mplite
        return mplite.ProcessPoolExecutor(self.workers, mp_context=self.ctx())

    def map(self, fn, args):
        return list(self.pool.map(fn, args))

    def pairs(self, fn, n):
        return list(self.pool.map(fn, range(n), [1] * n))

    roundtrip = PPE.roundtrip


class MpliteLambda(Mplite):
    """mplite with the same tiny task written as a lambda, which travels by value."""
    label = "mplite {v}, lambda task"
    workloads = ("W1", "W6")
    calls = {"W1": "tm.execute([Task(lambda a, b: a + b, i, 1) for i in range(n)], ...)",
             "W6": "tm.submit(Task(lambda a, b=1: a + b, i)); tm.take(timeout=None)"}

    def pairs(self, fn, n):
        return Mplite.pairs(self, adder_lambda if fn is adder else fn, n)

    def roundtrip(self, fn, arg):
        return Mplite.roundtrip(self, adder_lambda if fn is adder else fn, arg)


class MpliteBaseline(Mplite):
    """Another mplite.py (say, the last release) beside this one: --baseline-path DIR."""
    label = "mplite {v} (baseline)"
    path_option = "baseline_path"


class MpliteBaselineMap(MpliteMap):
    label = "mplite {v} tm.map (baseline)"
    path_option = "baseline_path"


class MpliteBaselineImap(MpliteImap):
    label = "mplite {v} tm.imap (baseline)"
    path_option = "baseline_path"
    workloads = ("W1a",)


class MpliteBaselinePPE(MplitePPE):
    label = "mplite {v} ProcessPoolExecutor (baseline)"
    path_option = "baseline_path"
    workloads = ("W1", "W1a")


class _SilentBar:
    def update(self, n=1):
        pass


class Mplite1(Mplite):
    """mplite 1.3.x: execute() draws a tqdm bar unless given a pbar; take() never blocks."""
    label = "mplite {v}"
    path_option = "mplite1_path"
    workloads = ("W1", "W2", "W3", "W4", "W5", "W6")  # no W8: 1.x has no tm.map
    calls = {"W1": "tm.execute([Task(adder, i, 1) for i in range(n)], pbar=silent)",
             "W6": "tm.submit(Task(adder, i)); poll tm.take() until not None"}

    def map(self, fn, args):
        return self.pool.execute([self.Task(fn, a) for a in args], pbar=_SilentBar())

    def pairs(self, fn, n):
        Task = self.Task
        return self.pool.execute([Task(fn, i, 1) for i in range(n)], pbar=_SilentBar())

    def roundtrip(self, fn, arg):
        self.pool.submit(self.Task(fn, arg))
        while True:  # busy-poll: the lowest latency this API allows (results here are never None)
            result = self.pool.take()
            if result is not None:
                return result


class Joblib(Adapter):
    label = "joblib {v}"
    module = "joblib"
    workloads = ("W1", "W1a", "W2", "W3")
    calls = {"W1": "Parallel(n_jobs=workers)(delayed(adder)(i, 1) for i in range(n))",
             "W1a": "Parallel(n_jobs=workers)(delayed(inc)(x) for x in xs)"}

    def open(self):
        import joblib
        self.delayed = joblib.delayed
        return joblib.Parallel(n_jobs=self.workers, backend="loky")  # `with`: workers reused

    def map(self, fn, args):
        delayed = self.delayed
        return self.pool(delayed(fn)(a) for a in args)

    def pairs(self, fn, n):
        delayed = self.delayed
        return self.pool(delayed(fn)(i, 1) for i in range(n))

    def version(self):
        import joblib
        return joblib.__version__

    @classmethod
    def method_note(cls, method):
        return "loky"  # joblib's loky backend takes no start method


class Loky(Adapter):
    label = "loky {v}"
    module = "loky"
    workloads = PPE.workloads
    calls = PPE.calls
    max_tiny = ONE_PER_MESSAGE_MAX
    replaced_methods = {"fork": "loky"}  # "Cannot use reusable executor with the 'fork' context"

    def open(self):
        import loky
        return loky.get_reusable_executor(max_workers=self.workers, context=self.method)

    map = PPE.map
    pairs = PPE.pairs
    roundtrip = PPE.roundtrip

    def version(self):
        import loky
        return loky.__version__


class Pebble(Adapter):
    label = "pebble {v}"
    module = "pebble"
    workloads = PPE.workloads
    calls = {"W1": "list(pool.map(adder, range(n), [1] * n, chunksize=1).result())",
             "W1a": "list(pool.map(inc, xs, chunksize=1).result())",
             "W6": "pool.submit(adder, None, i).result()"}
    max_tiny = ONE_PER_MESSAGE_MAX

    def open(self):
        import pebble
        return pebble.ProcessPool(max_workers=self.workers, context=self.ctx())

    def map(self, fn, args):
        return list(self.pool.map(fn, args, chunksize=1).result())

    def pairs(self, fn, n):
        return list(self.pool.map(fn, range(n), [1] * n, chunksize=1).result())

    def roundtrip(self, fn, arg):
        if hasattr(self.pool, "submit"):  # pebble >= 5
            return self.pool.submit(fn, None, arg).result()
        return self.pool.schedule(fn, args=[arg]).result()

    def version(self):
        return _dist_version("pebble")


class Mpire(Adapter):
    label = "mpire {v}"
    module = "mpire"
    workloads = PPE.workloads
    calls = {"W1": "pool.map(adder, [(i, 1) for i in range(n)])",
             "W1a": "pool.map(inc, [(x,) for x in xs])", "W6": "pool.apply(adder, args=(i,))"}

    def open(self):
        import mpire
        return mpire.WorkerPool(n_jobs=self.workers, start_method=self.method, keep_alive=True)

    def map(self, fn, args):
        # mpire unpacks iterable arguments (bytes included): wrap each in a 1-tuple.
        return self.pool.map(fn, [(a,) for a in args], progress_bar=False)

    def pairs(self, fn, n):
        return self.pool.map(fn, [(i, 1) for i in range(n)], progress_bar=False)

    def roundtrip(self, fn, arg):
        return self.pool.apply(fn, args=(arg,))

    def version(self):
        return _dist_version("mpire")


CONTENDERS = {
    "serial": Serial,
    "Pool.map": PoolMap,
    "Pool.starmap": PoolStarmap,
    "Pool.imap": PoolImap,
    "ProcessPoolExecutor": PPE,
    "pipe-floor": PipeFloor,
    "mplite": Mplite,
    "mplite.map": MpliteMap,
    "mplite.imap": MpliteImap,
    "mplite.PPE": MplitePPE,
    "mplite-lambda": MpliteLambda,
    "mplite-baseline": MpliteBaseline,
    "mplite.map-baseline": MpliteBaselineMap,
    "mplite.imap-baseline": MpliteBaselineImap,
    "mplite.PPE-baseline": MpliteBaselinePPE,
    "mplite1": Mplite1,
    "joblib": Joblib,
    "loky": Loky,
    "pebble": Pebble,
    "mpire": Mpire,
}
STDLIB = [name for name, cls in CONTENDERS.items() if cls.stdlib]


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return ""


# ----------------------------------------------------------------------------------------------
# Workloads, as run in a child: each returns {"seconds": wall time, ...}.

def _peak_rss_kib():
    """This process's peak resident set size so far, in KiB (ru_maxrss: bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


_BUILT_RSS_KIB = []  # see _built


def _built(inputs):
    """W1's inputs, once the call has built them: the RSS now (Linux) is what the pool's own
    records, copies and results are measured from (issue 18: not the user's list of calls)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/statm") as statm:
            _BUILT_RSS_KIB.append(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024)
    return inputs


def _timed(pool, call):
    """Start and warm up the pool, time call(), stop; return (measurements, its result).

    The peak RSS is read before the pool stops, while call()'s result is still held."""
    pool.start()
    try:
        pool.warm_up()
        base = _peak_rss_kib()
        del _BUILT_RSS_KIB[:]
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        peak = _peak_rss_kib()
    finally:
        pool.stop()
    measured = {"seconds": seconds, "rss_base_kib": base, "rss_peak_kib": peak}
    if _BUILT_RSS_KIB:
        measured["rss_built_kib"] = _BUILT_RSS_KIB[0]
    return measured, out


def _check(ok, what):
    if not ok:
        raise AssertionError("wrong results: " + what)


def _increments(out, n):
    return len(out) == n and all(r == i + 1 for i, r in enumerate(out))


def w1_pairs(pool, n):
    measured, out = _timed(pool, lambda: pool.pairs(adder, n))
    _check(_increments(out, n), "W1")
    measured["tasks"] = n
    return measured


def w1a_single(pool, n):
    xs = list(range(n))
    measured, out = _timed(pool, lambda: pool.map(inc, xs))
    _check(_increments(out, n), "W1a")
    measured["tasks"] = n
    return measured


def _cpu_map(pool, args, what):
    """Time spin() over args; also report the tasks' own CPU seconds (sum and longest)."""
    measured, out = _timed(pool, lambda: pool.map(spin, args))
    _check([n for n, _ in out] == args, what)
    cpu = [c for _, c in out]
    measured.update(work=sum(cpu), longest=max(cpu))
    return measured


def w2_uniform(pool, size=None):
    return _cpu_map(pool, [W2_MS] * W2_TASKS, "W2")


def w3_skewed(pool, size=None):
    return _cpu_map(pool, [W3_SHORT_MS] * W3_SHORT + [W3_LONG_MS] * W3_LONG, "W3")


def w4_startup(pool, size=None):
    t0 = time.perf_counter()
    pool.start()
    try:
        result = pool.roundtrip(adder, 1)
    finally:
        pool.stop()
    seconds = time.perf_counter() - t0
    _check(result == 2, "W4")
    return {"seconds": seconds}


def w5_payload(pool, size=None):
    payload = bytes(W5_BYTES)
    measured, out = _timed(pool, lambda: pool.map(echo, [payload] * W5_TASKS))
    _check(len(out) == W5_TASKS and all(len(b) == W5_BYTES for b in out), "W5")
    return measured


def w6_latency(pool, size=None):
    pool.start()
    try:
        pool.warm_up()
        results = []
        t0 = time.perf_counter()
        for i in range(W6_TRIPS):
            results.append(pool.roundtrip(adder, i))
        seconds = time.perf_counter() - t0
    finally:
        pool.stop()
    _check(results == [i + 1 for i in range(W6_TRIPS)], "W6")
    return {"seconds": seconds}


def w7_stream(pool, n):
    def consume():  # keeps no result: only the count and the mismatches
        count = wrong = 0
        for i, r in enumerate(pool.stream(inc, (x for x in range(n)))):
            count += 1
            if r != i + 1:
                wrong += 1
        return count, wrong

    measured, (count, wrong) = _timed(pool, consume)
    _check(count == n and wrong == 0, "W7 (%d results, %d wrong)" % (count, wrong))
    measured["tasks"] = n
    return measured


def _w8_case(run):
    """One W8 case: run() -> {"seconds": ..., ...}, or {"error": why}, so one case that fails
    (say, a TaskChain an engine can't run) still leaves the others' numbers."""
    try:
        return run()
    except Exception as e:
        return {"error": "%s: %s" % (type(e).__name__, (str(e).strip().splitlines() or [""])[-1])}


def _w8a_chain_then_touch(fresh):
    """W8a on a fresh pool, its start() inside the timing: a chain whose second step waits for
    a file, and a task that creates the file. Fast only if the touch runs on the other worker
    while the chain's step waits; behind it, it takes W8_WAIT s and the step reports False."""
    folder = tempfile.mkdtemp(prefix="mplite-bench-w8a-")
    path = os.path.join(folder, "touched")
    try:
        t0 = time.perf_counter()
        fresh.start()
        try:
            tasks = [fresh.TaskChain(fresh.Task(identity, path), next_task=then_wait_for_file),
                     fresh.Task(touch, path)]
            out = fresh.execute(tasks)
            seconds = time.perf_counter() - t0
        finally:
            fresh.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _check(len(out) == 2 and out[0] in (True, False) and out[1] is True, "W8a: %r" % (out,))
    return {"seconds": seconds, "seen": out[0]}


def _w8_timed(call, expected, what):
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    _check(out == expected, what)
    return {"seconds": seconds}


def w8_makespan(pool, size=None):
    """W8 makespan: the cases in pool.makespan_cases, each timed on its own (see W8_CASES).

    a: a fresh pool (see _w8a_chain_then_touch); then one pool, started and warmed up outside
    the timing, runs b, c and d in turn: b: 2000 tiny tasks, then 4 x a 1 s sleep; c: the same
    list reversed; d: plain_map(slow_pair, range(4000)), two adjacent 1 s calls in it."""
    cases, t0 = {}, time.perf_counter()
    if "a" in pool.makespan_cases and pool.workers >= 2:  # one worker always waits W8_WAIT s
        fresh = type(pool)(pool.workers, pool.method)
        cases["a"] = _w8_case(lambda: _w8a_chain_then_touch(fresh))
    if set(pool.makespan_cases) & {"b", "c", "d"}:
        pool.start()
        try:
            pool.warm_up()
            if "b" in pool.makespan_cases:
                Task = pool.Task
                tasks = ([Task(identity, i) for i in range(W8_TINY)]
                         + [Task(time.sleep, W8_SLEEP)] * W8_SLEEPS)  # as a user writes it
                expected = list(range(W8_TINY)) + [None] * W8_SLEEPS
                cases["b"] = _w8_case(lambda: _w8_timed(
                    lambda: pool.execute(tasks), expected, "W8b"))
                cases["c"] = _w8_case(lambda: _w8_timed(  # right after b, on the same pool
                    lambda: pool.execute(tasks[::-1]), expected[::-1], "W8c"))
            if "d" in pool.makespan_cases:
                xs = list(range(W8_CALLS))
                cases["d"] = _w8_case(lambda: _w8_timed(
                    lambda: pool.plain_map(slow_pair, xs), xs, "W8d"))
        finally:
            pool.stop()
    return {"seconds": time.perf_counter() - t0, "cases": cases}


class Workload:
    def __init__(self, key, title, unit, higher_is_better, run, fmt, sized=False):
        self.key, self.title, self.unit = key, title, unit
        self.higher_is_better, self.run, self.fmt, self.sized = higher_is_better, run, fmt, sized

    def better(self, a, b):
        return a > b if self.higher_is_better else a < b

    def relative(self, value, best):
        """How many times as good as best (> 1 = better), whichever way the metric runs."""
        return value / best if self.higher_is_better else best / value

    def arrow(self):
        return "\u2191" if self.higher_is_better else "\u2193"


WORKLOADS = {w.key: w for w in [
    Workload("W1", "W1 tiny tasks, 2 arguments", "tasks/s", True, w1_pairs, "{:,.0f}", True),
    Workload("W1a", "W1a tiny tasks, 1 argument", "tasks/s", True, w1a_single, "{:,.0f}", True),
    Workload("W2", "W2 uniform CPU", "efficiency", True, w2_uniform, "{:.2f}"),
    Workload("W3", "W3 skewed CPU", "makespan/ideal", False, w3_skewed, "{:.2f}"),
    Workload("W4", "W4 start-up", "s", False, w4_startup, "{:.3f}"),
    Workload("W5", "W5 payload", "MB/s", True, w5_payload, "{:,.0f}"),
    Workload("W6", "W6 latency", "\u00b5s/trip", False, w6_latency, "{:,.0f}"),
    Workload("W7", "W7 imap stream", "tasks/s", True, w7_stream, "{:,.0f}", True),
    Workload("W8", "W8 makespan", "s", False, w8_makespan, "{:.2f}"),
]}
TINY = ("W1", "W1a")


def child_main(opts):
    if opts.import_path:
        sys.path.insert(0, opts.import_path)
    pool = CONTENDERS[opts.contender](opts.workers[0], opts.method)
    if pool.module:  # import before any clock starts, as the stdlib pools are imported already
        importlib.import_module(pool.module)
    why = pool.missing()
    if why:
        print(json.dumps({"na": why}))
        return
    measured = WORKLOADS[opts.workload].run(pool, opts.size)
    measured["version"] = pool.version()
    print(json.dumps(measured))


# ----------------------------------------------------------------------------------------------
# Parent: find contenders, run children, tabulate.

def probe(module, path):
    """(version, None) if `module` imports in a new interpreter, `path` first; else (None, why)."""
    code = ("import os, sys\n"
            "sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]  # as in a child\n"
            "if sys.argv[1]: sys.path.insert(0, sys.argv[1])\n"
            "import importlib; m = importlib.import_module(sys.argv[2])\n"
            "v = getattr(m, '__version__', '')\n"
            "if not v:\n"
            "    from importlib.metadata import version; v = version(sys.argv[2])\n"
            "print(v)\n")
    proc = subprocess.run([sys.executable, "-c", code, path or "", module],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, (lines[-1] if lines else "import failed")
    return proc.stdout.strip(), None


def available_contenders(opts):
    """{name: (label, import path)} to run, and a list of 'name (why)' for those skipped."""
    chosen, skipped, probed = {}, [], {}
    for name, cls in CONTENDERS.items():
        if opts.only and name not in opts.only:
            continue
        bare = cls.label.replace("{v}", "").replace("  ", " ").strip()
        path = getattr(opts, cls.path_option) if cls.path_option else None
        if cls.path_option and not path:
            skipped.append("%s (give --%s DIR%s)" % (
                "mplite 1.x" if name == "mplite1" else bare,
                cls.path_option.replace("_", "-"),
                " or MPLITE1_PATH" if name == "mplite1" else ""))
            continue
        if cls.module is None:
            chosen[name] = (cls.label, None)
            continue
        if (cls.module, path) not in probed:
            probed[(cls.module, path)] = probe(cls.module, path)
        version, why = probed[(cls.module, path)]
        if name == "mplite1" and version and not version.startswith("1."):
            version, why = None, "found mplite %s in %s, not 1.x" % (version, path)
        if version is None:
            skipped.append("%s (%s)" % (bare, why))
            continue
        chosen[name] = (cls.label.format(v=version), path)
    return chosen, skipped


def run_child(opts, name, path, workload, method, workers, size):
    """(the child's measurements, None) or (None, error text)."""
    cmd = [sys.executable, SCRIPT, "--child", name, workload, "--method", method,
           "--workers", str(workers)]
    if size is not None:
        cmd += ["--size", str(size)]
    if path:
        cmd += ["--import-path", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.child_timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out after %s s" % opts.child_timeout
    if proc.returncode == 0:
        try:
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            if "seconds" in measured or "na" in measured:
                return measured, None
        except (ValueError, IndexError, KeyError):
            pass
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return None, "exit %s: %s" % (proc.returncode, tail)


def metric(key, run, workers):
    """One run's measurements (as a child printed them) -> the workload's metric."""
    seconds = run["seconds"]
    if key in ("W1", "W1a", "W7"):
        return run["tasks"] / seconds
    if key == "W2":  # serial time = the tasks' own CPU seconds, measured in this run
        return run["work"] / (workers * seconds)
    if key == "W3":
        return seconds / max(run["work"] / workers, run["longest"])
    if key == "W4":
        return seconds
    if key == "W5":
        return 2 * W5_TASKS * W5_BYTES / seconds / 1e6
    if key == "W6":
        return seconds / W6_TRIPS * 1e6
    if key == "W8":  # the child's whole run; the tables show each case (Results.case)
        return seconds
    raise KeyError(key)


def w8_ideal(case, workers):
    """W8's ideal makespan, in s, on `workers` workers (None for W8a: ~0 s plus start-up)."""
    if case in ("b", "c"):
        return -(-W8_SLEEPS // workers) * W8_SLEEP
    if case == "d":
        return -(-len(W8_SLOW) // workers) * W8_SLEEP
    return None


def machine_line():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = " (%s)" % line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs%s, %s %s, %s" % (cpus, model, platform.python_implementation(),
                                     platform.python_version(), platform.platform())


def load_average():
    try:
        return "%.1f" % os.getloadavg()[0]
    except (AttributeError, OSError):
        return "n/a"


def sizes_of(key, opts):
    if key == "W7":
        return [opts.imap_items]
    return list(opts.sizes) if WORKLOADS[key].sized else [None]


def cell_key(name, workers, method, key, size):
    """Where a run's results are kept: the serial loop's do not depend on workers or method."""
    if name == "serial":
        return (0, name, "any", key, size)
    return (workers, name, method, key, size)


class Results:
    """The children's measurements, errors and 'n/a' answers, by cell_key()."""

    def __init__(self):
        self.runs, self.errors, self.na = {}, {}, {}
        self.case_errors = {}  # (cell key, W8 case) -> the errors of its runs

    def case(self, name, workers, method, case):
        """A W8 case: (its runs' seconds, their results (W8a: file seen?), errors)."""
        k = cell_key(name, workers, method, "W8", None)
        runs = [r["cases"][case] for r in self.runs.get(k, []) if case in r["cases"]
                and "error" not in r["cases"][case]]
        return ([r["seconds"] for r in runs], [r.get("seen") for r in runs],
                self.case_errors.get((k, case), []))

    def value(self, name, workers, method, key, size):
        runs = self.runs.get(cell_key(name, workers, method, key, size))
        if not runs:
            return None
        return statistics.median(metric(key, r, workers) for r in runs)

    def rss(self, name, workers, method, key, size):
        """(median peak RSS, median baseline RSS) in MB, or None."""
        runs = [r for r in self.runs.get(cell_key(name, workers, method, key, size), [])
                if "rss_peak_kib" in r]
        if not runs:
            return None
        return (statistics.median(r["rss_peak_kib"] for r in runs) * 1024 / 1e6,
                statistics.median(r["rss_base_kib"] for r in runs) * 1024 / 1e6)

    def kept(self, name, workers, method, key, size):
        """Median MB the call added at its peak over the RSS once its inputs were built, or None."""
        runs = [r for r in self.runs.get(cell_key(name, workers, method, key, size), [])
                if "rss_built_kib" in r]
        if not runs:
            return None
        return statistics.median(r["rss_peak_kib"] - r["rss_built_kib"] for r in runs) * 1024 / 1e6

    def problem(self, name, workers, method, key, size):
        """The text of a cell that holds no number ("error", "n/a (...)"), or None."""
        k = cell_key(name, workers, method, key, size)
        if k in self.errors:
            return "error"
        if k in self.na:
            return "n/a (%s)" % self.na[k]
        return None


def _ratio(r):
    return "%.2f" % r if r >= 0.1 else "%.2g" % r


def _best_stdlib(res, names, workers, method, key, size):
    """(name, value) of the best stdlib pool for this cell, or None."""
    w, best = WORKLOADS[key], None
    for name in STDLIB:
        if name not in names or key not in CONTENDERS[name].workloads:
            continue
        v = res.value(name, workers, method, key, size)
        if v is not None and (best is None or w.better(v, best[1])):
            best = (name, v)
    return best


def _cell(res, chosen, name, workers, method, key, size):
    w = WORKLOADS[key]
    problem = res.problem(name, workers, method, key, size)
    if problem:
        return problem
    cls = CONTENDERS[name]
    if size is not None and cls.max_tiny is not None and size > cls.max_tiny and key in TINY:
        return "skipped"
    v = res.value(name, workers, method, key, size)
    if v is None:
        return "\u2014"
    best = _best_stdlib(res, chosen, workers, method, key, size)
    if name == "serial" or best is None:
        return w.fmt.format(v)
    text = "%s (%s\u00d7)" % (w.fmt.format(v), _ratio(w.relative(v, best[1])))
    return "**%s**" % text if best[0] == name else text


def _label(chosen, name, method):
    label = chosen[name][0]
    used = CONTENDERS[name].method_note(method)
    return label + (" (start method: %s)" % used if used else "")


def render_tiny(opts, res, chosen, key, workers, method):
    """The W1 or W1a table: one row per contender, its call, tasks/s per size, peak RSS."""
    names = [n for n in chosen if key in CONTENDERS[n].workloads]
    if not names:
        return []
    sizes = sizes_of(key, opts)
    big = max(sizes)
    shape = ("two arguments per call: adder(i, 1)" if key == "W1"
             else "one argument per call: inc(x), over xs = list(range(n))")
    lines = ["*%s: %s*" % (key, shape), "",
             "| contender | call | " + " | ".join(
                 "%s tasks, tasks/s \u2191" % format(s, ",") for s in sizes)
             + " | peak RSS at %s, MB (baseline) \u2193 |" % format(big, ","),
             "|---|---|" + "---:|" * (len(sizes) + 1)]
    for name in names:
        cells = [_cell(res, chosen, name, workers, method, key, s) for s in sizes]
        rss = res.rss(name, workers, method, key, big)
        cells.append(res.problem(name, workers, method, key, big)
                     or ("%.0f (%.0f)" % rss if rss else "\u2014"))
        lines.append("| %s | `%s` | %s |" % (_label(chosen, name, method),
                                             CONTENDERS[name].calls.get(key, ""),
                                             " | ".join(cells)))
    return lines + [""]


def render_main(opts, res, chosen, keys, workers, method):
    """W2-W6: rows = contenders, columns = workloads."""
    names = [n for n in chosen if any(k in CONTENDERS[n].workloads for k in keys)]
    if not keys or not names:
        return []
    lines = ["| contender | " + " | ".join(
        "%s, %s %s" % (WORKLOADS[k].title, WORKLOADS[k].unit, WORKLOADS[k].arrow())
        for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in names:
        cells = [_cell(res, chosen, name, workers, method, k, None) for k in keys]
        lines.append("| %s | %s |" % (_label(chosen, name, method), " | ".join(cells)))
    return lines + [""]


def render_stream(opts, res, chosen, workers, method):
    names = [n for n in chosen if "W7" in CONTENDERS[n].workloads]
    n = opts.imap_items
    if not names:
        return []
    lines = ["*W7: `for r in tm.imap(inc, (i for i in range(%s)))`, results checked and "
             "dropped*" % format(n, "_"), "",
             "| contender | tasks/s \u2191 | peak RSS, MB \u2193 | baseline RSS, MB |",
             "|---|---:|---:|---:|"]
    for name in names:
        problem = res.problem(name, workers, method, "W7", n)
        v = res.value(name, workers, method, "W7", n)
        rss = res.rss(name, workers, method, "W7", n)
        if problem or v is None:
            cells = [problem or "\u2014"] * 3
        else:
            cells = ["{:,.0f}".format(v), "%.0f" % rss[0], "%.0f" % rss[1]]
        lines.append("| %s | %s |" % (_label(chosen, name, method), " | ".join(cells)))
    return lines + [""]


def render_latency(opts, res, chosen, workers, method):
    """W6: us per trip, and that as a multiple of the stdlib ProcessPoolExecutor's and of the
    Pipe floor's."""
    names = [n for n in chosen if "W6" in CONTENDERS[n].workloads]
    if not names:
        return []
    refs = ("ProcessPoolExecutor", "pipe-floor")
    lines = ["*W6: %d sequential round trips of adder(i); time per trip as a multiple of the "
             "stdlib ProcessPoolExecutor's and of the Pipe floor's (lower = faster)*" % W6_TRIPS,
             "", "| contender | call | \u00b5s/trip \u2193 | \u00f7 ProcessPoolExecutor \u2193 | "
             "\u00f7 Pipe floor \u2193 |", "|---|---|---:|---:|---:|"]
    for name in names:
        cells = [_cell(res, chosen, name, workers, method, "W6", None)]
        v = res.value(name, workers, method, "W6", None)
        for ref in refs:
            r = res.value(ref, workers, method, "W6", None)
            cells.append("\u2014" if v is None or r is None else "%.2f\u00d7" % (v / r))
        lines.append("| %s | `%s` | %s |" % (_label(chosen, name, method),
                                             CONTENDERS[name].calls.get("W6", ""),
                                             " | ".join(cells)))
    return lines + [""]


def render_makespan(opts, res, chosen, workers, method):
    """W8: each case's seconds (median) and seconds / ideal."""
    names = [n for n in chosen if "W8" in CONTENDERS[n].workloads]
    if not names:
        return []
    heads = {"a": "a: chain + touch, fresh pool, s (file seen) \u2193",
             "b": "b: %s tiny, then %d \u00d7 %g s, s (\u00f7 ideal %g s) \u2193" % (
                 format(W8_TINY, ","), W8_SLEEPS, W8_SLEEP, w8_ideal("b", workers)),
             "c": "c: b reversed, s (\u00f7 ideal %g s) \u2193" % w8_ideal("c", workers),
             "d": "d: map over %s, 2 adjacent %g s calls, s (\u00f7 ideal %g s) \u2193" % (
                 format(W8_CALLS, ","), W8_SLEEP, w8_ideal("d", workers))}
    lines = ["*W8 makespan on %d workers: seconds (median), seconds / ideal, [fastest\u2013"
             "slowest run]*" % workers, "",
             "| contender | call | " + " | ".join(heads[c] for c in W8_CASES) + " |",
             "|---|---|" + "---:|" * len(W8_CASES)]
    for name in names:
        problem = res.problem(name, workers, method, "W8", None)
        cells = []
        for case in W8_CASES:
            if problem:
                cells.append(problem)
                continue
            runs, seen, errors = res.case(name, workers, method, case)
            if not runs:
                cells.append("error" if errors else "\u2014")
                continue
            seconds, ideal = statistics.median(runs), w8_ideal(case, workers)
            text = "%.2f" % seconds
            if case == "a":
                text += " (%d/%d)" % (sum(x is True for x in seen), len(seen))
            elif ideal:
                text += " (%.2f\u00d7)" % (seconds / ideal)
            if len(runs) > 1:  # a schedule may differ from run to run: show how far
                text += " [%.2f\u2013%.2f]" % (min(runs), max(runs))
            if errors:
                text += ", %d error(s)" % len(errors)
            cells.append(text)
        lines.append("| %s | `%s` | %s |" % (_label(chosen, name, method),
                                             CONTENDERS[name].calls.get("W8", ""),
                                             " | ".join(cells)))
    return lines + [""]


def targets(opts, res, chosen, method):
    """Issue 8's goals at 2 workers, as (what, measured, met) rows."""
    rows, w = [], 2

    def ratio(a, b, key, size):
        va, vb = res.value(a, w, method, key, size), res.value(b, w, method, key, size)
        return None if va is None or vb is None else va / vb

    def row(what, value, ok, fmt="%.2f\u00d7", needs=()):
        if value is not None:
            rows.append((what, fmt % value, "yes" if ok(value) else "**no**"))
        elif needs and all(n in chosen for n in needs):  # measured, but no number to show
            rows.append((what, "n/a", "\u2014"))

    for size in opts.sizes if "W1" in opts.workloads else []:
        s = format(size, ",")
        row("W1 %s: mplite execute \u2265 0.5\u00d7 Pool.starmap" % s,
            ratio("mplite", "Pool.starmap", "W1", size), lambda r: r >= 0.5,
            needs=("mplite", "Pool.starmap"))
        row("W1 %s: mplite execute \u2265 1.0\u00d7 joblib" % s,
            ratio("mplite", "joblib", "W1", size), lambda r: r >= 1.0,
            needs=("mplite", "joblib"))
    for size in opts.sizes if "W1a" in opts.workloads else []:
        for name, what in (("mplite.map", "tm.map"), ("mplite.imap", "tm.imap"),
                           ("mplite.PPE", "mplite ProcessPoolExecutor.map")):
            row("W1a %s: %s \u2265 0.7\u00d7 Pool.map" % (format(size, ","), what),
                ratio(name, "Pool.map", "W1a", size), lambda r: r >= 0.7,
                needs=(name, "Pool.map"))
    if "W1" in opts.workloads:
        big = max(opts.sizes)
        a = res.rss("mplite", w, method, "W1", big)
        b = res.rss("Pool.starmap", w, method, "W1", big)
        if a and b:
            row("W1 %s: mplite execute's peak RSS \u2264 1.3\u00d7 Pool.starmap's (%.0f vs "
                "%.0f MB)" % (format(big, ","), a[0], b[0]), a[0] / b[0], lambda r: r <= 1.3)
        a = res.kept("mplite", w, method, "W1", big)
        b = res.kept("Pool.starmap", w, method, "W1", big)
        if a is not None and b:  # what issue 18 asks: the pool's own, beyond the Tasks or tuples built
            row("W1 %s: what execute keeps beyond the Tasks \u2264 1.3\u00d7 what Pool.starmap keeps "
                "beyond its tuples (%.0f vs %.0f MB)" % (format(big, ","), a, b), a / b, lambda r: r <= 1.3)
    if "W7" in opts.workloads:
        n = opts.imap_items
        rss = res.rss("mplite.imap", w, method, "W7", n)
        row("W7: tm.imap over a %s-item generator \u2264 100 MB peak RSS" % format(n, ","),
            rss and rss[0], lambda mb: mb <= 100, "%.0f MB", needs=("mplite.imap",))
    if "W6" in opts.workloads:
        for name, what in (("mplite", "TaskManager submit + take(timeout=None)"),
                           ("mplite.PPE", "mplite ProcessPoolExecutor.submit().result()")):
            row("W6: %s \u2264 0.5\u00d7 stdlib ProcessPoolExecutor.submit().result() "
                "(time per trip)" % what, ratio(name, "ProcessPoolExecutor", "W6", None),
                lambda r: r <= 0.5, needs=(name, "ProcessPoolExecutor"))
            row("W6 (moonshot): %s \u2264 2\u00d7 the Pipe floor (time per trip)" % what,
                ratio(name, "pipe-floor", "W6", None), lambda r: r <= 2.0,
                needs=(name, "pipe-floor"))
    if "W4" in opts.workloads and method == "spawn":
        v = ratio("mplite", "ProcessPoolExecutor", "W4", None)
        row("W4 spawn: mplite start-up \u2264 1.1\u00d7 ProcessPoolExecutor's", v,
            lambda r: r <= 1.1)
    return rows


def render_sweep(opts, res, chosen, method):
    """W1/W1a (smallest size) tasks/s and W6 latency per contender and worker count."""
    lines = ["*sweep, start method %s*" % method, "",
             "| workload | contender | " + " | ".join(
                 "%d workers" % w for w in opts.workers) + " |",
             "|---|---|" + "---:|" * len(opts.workers)]
    rows = 0
    for key in ("W1", "W1a", "W6"):
        if key not in opts.workloads:
            continue
        size = min(opts.sizes) if key in TINY else None
        what = "%s %s tasks/s \u2191" % (key, format(size, ",")) if size else "W6 \u00b5s/trip \u2193"
        for name in chosen:
            if name == "serial" or key not in CONTENDERS[name].workloads:
                continue
            cells = [res.problem(name, w, method, key, size) or
                     (lambda v: "\u2014" if v is None else WORKLOADS[key].fmt.format(v))(
                         res.value(name, w, method, key, size)) for w in opts.workers]
            lines.append("| %s | %s | %s |" % (what, _label(chosen, name, method),
                                               " | ".join(cells)))
            rows += 1
    if 2 in opts.workers and 8 in opts.workers and "W1" in opts.workloads:
        size = min(opts.sizes)
        a = res.value("mplite", 8, method, "W1", size)
        b = res.value("mplite", 2, method, "W1", size)
        if a and b:
            lines += ["", "Target: mplite execute W1 %s at 8 workers \u2265 at 2: %.2f\u00d7 "
                      "(%s)." % (format(size, ","), a / b, "yes" if a >= b else "**no**")]
    return lines + [""] if rows else []


def render(opts, chosen, skipped, res, elapsed, load_before):
    """The Markdown report."""
    argv = ["python"] + sys.argv
    lines = [
        "Machine: %s. Command: `%s` (workers=%s, repeats=%d, took %.0f s; load average %s "
        "before, %s after)." % (
            machine_line(), " ".join(shlex.quote(a) for a in argv),
            ",".join(map(str, opts.workers)), opts.repeat, elapsed, load_before,
            load_average()),
        "",
    ]
    main_keys = [k for k in opts.workloads if k not in TINY and k not in ("W6", "W7", "W8")]
    for workers in opts.workers:
        for method in opts.methods:
            lines += ["**%d workers, start method: %s**" % (workers, method), ""]
            for key in TINY:
                if key in opts.workloads:
                    lines += render_tiny(opts, res, chosen, key, workers, method)
            lines += render_main(opts, res, chosen, main_keys, workers, method)
            if "W6" in opts.workloads:
                lines += render_latency(opts, res, chosen, workers, method)
            if "W7" in opts.workloads:
                lines += render_stream(opts, res, chosen, workers, method)
            if "W8" in opts.workloads:
                lines += render_makespan(opts, res, chosen, workers, method)
            if workers == 2:
                rows = targets(opts, res, chosen, method)
                if rows:
                    lines += ["*Targets (issue 8; 2 workers, medians)*", "",
                              "| target | measured | met |", "|---|---:|---|"]
                    lines += ["| %s | %s | %s |" % r for r in rows] + [""]
    if len(opts.workers) > 1:
        for method in opts.methods:
            lines += render_sweep(opts, res, chosen, method)
    lines += [
        "Median of %d run(s), each in a fresh process. Bold: the best stdlib pool "
        "(Pool.map, Pool.starmap, Pool.imap, ProcessPoolExecutor) for that workload, size and "
        "call shape; (r\u00d7): performance relative to it, above 1 = better. \u2191 higher is "
        "better, \u2193 lower is better. W1: n x adder(i, 1), two arguments per call, the calls "
        "built inside the timing; W1a: n x inc(x), one argument per call, over a list built "
        "before; skipped: one task per message (chunksize=1), which would take minutes at "
        "that size. Peak RSS: the benchmark process's own high-water mark (ru_maxrss, "
        "1 MB = 10^6 bytes), workers not included; baseline: the same right before the "
        "clock started (interpreter, library, started pool). "
        "W2: 40 x 50 ms CPU, efficiency = the tasks' CPU seconds / (workers x wall); W3: "
        "56 x 10 ms + 4 x 400 ms last, makespan / max(tasks' CPU seconds / workers, longest "
        "task); W4: start, one task, stop; W5: 16 x 16 MiB echoed, MB/s both ways; W6: 500 "
        "sequential round trips (Pipe floor: no pool, a bare multiprocessing.Pipe to one child "
        "that runs the same call); W7: tm.imap over a generator, results dropped; W8: "
        "makespans with known ideals (a: a TaskChain whose second step waits up to %g s for "
        "a file that the next task creates, on a fresh pool whose start is timed: the count "
        "is the runs whose step saw the file; b: %d tiny tasks then %d x a %g s sleep; c: "
        "the same reversed, right after b on the same pool; d: a map over %d calls of which "
        "two adjacent ones sleep %g s). "
        "Pool.imap W4/W6: same pool as Pool.map. joblib runs loky's own start method (a fresh "
        "interpreter, like spawn) under every method. The serial row depends on neither the "
        "start method nor the worker count." % (opts.repeat, W8_WAIT, W8_TINY, W8_SLEEPS,
                                                 W8_SLEEP, W8_CALLS, W8_SLEEP),
    ]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def make_plan(opts, chosen):
    plan, serial_done = [], set()
    for rep in range(opts.repeat):
        for workers in opts.workers:
            for method in opts.methods:
                for key in opts.workloads:
                    for size in sizes_of(key, opts):
                        for name, (label, path) in chosen.items():
                            cls = CONTENDERS[name]
                            if key not in cls.workloads:
                                continue
                            if (key in TINY and cls.max_tiny is not None
                                    and size > cls.max_tiny):
                                continue
                            if name == "serial":  # no pool: one set of runs serves all
                                if (rep, key, size) in serial_done:
                                    continue
                                serial_done.add((rep, key, size))
                            plan.append((name, path, workers, method, key, size))
    return plan


def parent_main(opts):
    started = time.perf_counter()
    chosen, skipped = available_contenders(opts)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    load_before = load_average()
    if load_before != "n/a" and float(load_before) > 0.5 * os.cpu_count():
        log("warning: load average %s on %d CPUs: other work will skew the numbers"
            % (load_before, os.cpu_count()))
    log("contenders: %s; skipped: %s" % (
        ", ".join(label.format(v="?") for label, _ in chosen.values()),
        "; ".join(skipped) or "none"))

    plan = make_plan(opts, chosen)
    res = Results()
    for i, (name, path, workers, method, key, size) in enumerate(plan, 1):
        measured, error = run_child(opts, name, path, key, method, workers, size)
        where = cell_key(name, workers, method, key, size)
        what = "[%d/%d] %dw %s %s%s %s" % (i, len(plan), workers, method, key,
                                           "" if size is None else " n=%d" % size, name)
        if error:
            res.errors[where] = error
            log("%s: FAILED %s" % (what, error))
        elif "na" in measured:
            res.na[where] = measured["na"]
            log("%s: n/a (%s)" % (what, measured["na"]))
        else:
            res.runs.setdefault(where, []).append(measured)
            log("%s: %.4f s%s" % (what, measured["seconds"], "" if "rss_peak_kib" not in
                                  measured else ", peak RSS %.0f MB" %
                                  (measured["rss_peak_kib"] * 1024 / 1e6)))
            for case, got in sorted(measured.get("cases", {}).items()):
                if "error" in got:
                    res.case_errors.setdefault((where, case), []).append(got["error"])
                    log("    W8%s: FAILED %s" % (case, got["error"]))
                else:
                    log("    W8%s: %.3f s%s" % (case, got["seconds"], "" if "seen" not in got
                                                else " (file seen: %s)" % got["seen"]))

    report = render(opts, chosen, skipped, res, time.perf_counter() - started, load_before)
    print(report)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(report)
    for (workers, name, method, key, size), error in res.errors.items():
        log("FAILED %dw %s %s %s %s: %s" % (workers, method, key, size, name, error))
    for ((workers, name, method, key, _), case), errors in res.case_errors.items():
        log("FAILED %dw %s %s%s %s: %s" % (workers, method, key, case, name, errors[0]))
    return 1 if res.errors or res.case_errors else 0


def _int_list(text):
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description="mplite benchmark (see the module docstring).")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown (3)")
    p.add_argument("--workers", default="2",
                   help="worker processes for every pool; a list (2,4,8,16) runs a sweep (2)")
    p.add_argument("--methods", default="spawn,fork",
                   help="comma-separated start methods (spawn,fork)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. W1,W1a,W6 (all)")
    p.add_argument("--sizes", default=",".join(map(str, W1_SIZES)),
                   help="task counts for W1 and W1a (%s)" % ",".join(map(str, W1_SIZES)))
    p.add_argument("--imap-items", type=int, default=W7_ITEMS,
                   help="items of W7's generator (%d)" % W7_ITEMS)
    p.add_argument("--only", default="",
                   help="comma-separated contenders (%s); default: all available" %
                   ", ".join(CONTENDERS))
    p.add_argument("--out", help="also write the Markdown tables to this file")
    p.add_argument("--mplite-path", default=REPO_ROOT,
                   help="folder holding the mplite to test (default: the repository root)")
    p.add_argument("--baseline-path", default="",
                   help="folder holding another mplite.py to compare with, e.g. the last release")
    p.add_argument("--mplite1-path", default=os.environ.get("MPLITE1_PATH", ""),
                   help="folder holding mplite 1.3.x (default: $MPLITE1_PATH)")
    p.add_argument("--child-timeout", type=float, default=300,
                   help="seconds before one run counts as failed (300)")
    # Internal: run one measurement in this process.
    p.add_argument("--child", nargs=2, metavar=("CONTENDER", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--method", default="spawn", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--import-path", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.methods = [m for m in opts.methods.split(",") if m]
    wanted = {w.strip().upper(): w for w in opts.workloads.split(",") if w.strip()}
    for w in wanted:
        if w not in {k.upper() for k in WORKLOADS}:
            p.error("unknown workload %r (choose from %s)" % (wanted[w], ", ".join(WORKLOADS)))
    opts.workloads = [k for k in WORKLOADS if k.upper() in wanted]
    opts.only = [c for c in opts.only.split(",") if c]
    try:
        opts.workers = _int_list(opts.workers)
        opts.sizes = _int_list(opts.sizes)
    except ValueError:
        p.error("--workers and --sizes take comma-separated whole numbers")
    for m in opts.methods:
        if m not in multiprocessing.get_all_start_methods():
            p.error("start method %r is not available here" % m)
    for c in opts.only:
        if c not in CONTENDERS:
            p.error("unknown contender %r (choose from %s)" % (c, ", ".join(CONTENDERS)))
    if (opts.repeat < 1 or not opts.workers or min(opts.workers) < 1 or not opts.sizes
            or min(opts.sizes) < 1 or opts.imap_items < 1):
        p.error("--repeat, --workers, --sizes and --imap-items must be >= 1")
    if opts.child:
        opts.contender, opts.workload = opts.child
    return opts


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    if options.child:
        child_main(options)
    else:
        sys.exit(parent_main(options))
