#!/usr/bin/env python3
"""Benchmark mplite against the standard library's process pools (and peers, when installed).

Usage
-----
    python benchmarks/bench.py                        # the full run: ~3.5 minutes on 2 cores
    python benchmarks/bench.py --out benchmarks/results/bench.md   # also write the Markdown there
    python benchmarks/bench.py --methods spawn --repeat 5 --workers 4
    python benchmarks/bench.py --only mplite,Pool.map --workloads W1,W6   # a quick subset
    python benchmarks/bench.py --mplite1-path DIR     # add mplite 1.3.x (or set MPLITE1_PATH=DIR)
    python benchmarks/bench.py --baseline-path DIR    # add another mplite.py, e.g. the last release

mplite 1.3.x is also called ``mplite``, so it cannot be imported beside this repository's
mplite.py: install it into a throw-away folder and point --mplite1-path at it, e.g.
``pip install --target /tmp/mplite1 mplite==1.3.1 tqdm tblib``. The folder is put first on
sys.path for that contender's runs only. loky, pebble and mpire are measured when importable
(e.g. via PYTHONPATH); the script needs none of them and says which were skipped.
Standard library only, Python 3.8+.

How it measures
---------------
Every (contender, workload, start method, repeat) runs in a fresh interpreter: the script
re-invokes itself as ``bench.py --child CONTENDER WORKLOAD ...`` and the child prints one JSON
line with what it measured (wall time; for W2/W3 also the tasks' CPU times). Task functions
live in this module, so spawn workers find them as ``__main__.<name>``. Runs are interleaved
(repeat -> method -> workload -> contender); the table shows the median of each cell's runs.
All pools get the same worker count (--workers) and start method (--methods) where the library
allows it. Except in W4, the pool is started and warmed up (each worker has run a task) before
the clock starts, and stopped after it stops.

  workload        what                                          metric (better when)
  W1 tiny tasks   20,000 x adder(i), which returns i + 1        tasks/s (higher)
  W2 uniform CPU  40 x 50 ms pure-Python CPU*                   parallel efficiency (higher)
                                                                = serial time / (workers x wall)*
  W3 skewed CPU   56 x 10 ms, then 4 x 400 ms CPU* (long last)  makespan / ideal (lower), ideal
                                                                = max(serial total / workers,
                                                                      longest task)*
  W4 start-up     create the pool, run one task, stop it        seconds (lower)
  W5 payload      16 x a 16 MiB bytes argument, echoed back     MB/s both ways (higher)
                                                                = 2 x 16 x 16 MiB / wall
  W6 latency      500 sequential round trips (submit one task,  us per trip (lower)
                  wait for its result)

* A CPU task is a pure-Python loop that runs until its own thread has used that many ms of CPU
(time.thread_time), and reports the CPU seconds it used. Serial time, serial total and longest
task are those reported CPU seconds, from the same run. A loop count calibrated up front, or a
wall-clock serial baseline from a separate run, would not do: on shared or virtual machines the
speed of the same loop drifts by 2-3x within minutes (seen on the 2-core machine this was
written on), while CPU seconds drift with it, so the ratios stay honest. Whatever takes CPU
from the workers (the parent's own overhead, or other load on the machine) lowers efficiency.
The serial loop is the floor for W1 only (in W2/W3 it would score 1 / workers and `workers`,
by definition); it has no pool, so one set of its runs serves every start method.

Contenders: serial loop; multiprocessing.Pool (``map``, default chunksize; ``imap``,
chunksize=1; W4/W6 use one Pool, ``apply_async().get()`` for W6, so they are shown once under
Pool.map); concurrent.futures.ProcessPoolExecutor (``map`` chunksize=1, ``submit().result()``);
mplite (``execute``, ``submit`` + ``take(timeout=None)``); mplite's ProcessPoolExecutor (``map``,
``submit().result()``); mplite with W1's task written as a lambda (it travels by value); optional: another mplite.py given by --baseline-path (as mplite); mplite 1.3.x (``execute``
with a silent pbar; W6 polls the non-blocking ``take()``), loky (``get_reusable_executor``,
which refuses 'fork': it gets loky's own start method there, and the table says so), pebble
(``ProcessPool``), mpire (``WorkerPool``, keep_alive=True).

The "best stdlib pool" of a workload is the best of Pool.map, Pool.imap and
ProcessPoolExecutor for that metric (in bold). Every pool cell also shows its performance
relative to it: (1.25x) means 1.25 times as good, whichever direction the metric runs
(value / best for higher-is-better metrics, best / value for lower-is-better ones).
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
import statistics
import subprocess
import sys
import time

SCRIPT = os.path.abspath(__file__)
REPO_ROOT = os.path.dirname(os.path.dirname(SCRIPT))

W1_TASKS = 20000
W2_TASKS, W2_MS = 40, 50
W3_SHORT, W3_SHORT_MS, W3_LONG, W3_LONG_MS = 56, 10, 4, 400
W5_TASKS, W5_BYTES = 16, 16 * 1024 * 1024
W6_TRIPS = 500


# ----------------------------------------------------------------------------------------------
# Task functions (module level, so every start method can pickle them by reference).

def adder(a, b=1):
    return a + b


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


# ----------------------------------------------------------------------------------------------
# Contenders: one small adapter each, with a common interface.

class Adapter:
    """start() / map(fn, args) -> list / roundtrip(fn, arg) -> result / stop().

    open() returns the library's pool as a context manager; start() enters it and stop() exits
    it, so each pool is shut down exactly the way ``with`` would do it.
    """

    label = ""
    stdlib = False
    workloads = ("W1", "W2", "W3", "W4", "W5", "W6")
    module = None  # the import that makes it available (None: always available)
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

    def roundtrip(self, fn, arg):
        return self.map(fn, [arg])[0]

    def warm_up(self):
        """Let every worker run a task before the clock starts."""
        self.map(nap, [0.02] * (2 * self.workers))

    def version(self):
        return ""

    def ctx(self):
        return multiprocessing.get_context(self.method)


class Serial(Adapter):
    label = "serial loop"
    workloads = ("W1",)  # W2/W3 would show 1 / workers and `workers`, by definition

    def open(self):
        return contextlib.nullcontext()

    def warm_up(self):
        pass

    def map(self, fn, args):
        return [fn(a) for a in args]


class PoolMap(Adapter):
    label = "Pool.map"
    stdlib = True

    def open(self):
        return self.ctx().Pool(self.workers)

    def map(self, fn, args):
        return self.pool.map(fn, args)

    def roundtrip(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)).get()


class PoolImap(PoolMap):
    label = "Pool.imap"
    workloads = ("W1", "W2", "W3", "W5")  # W4 and W6 would measure the same Pool as Pool.map

    def map(self, fn, args):
        return list(self.pool.imap(fn, args, chunksize=1))


class PPE(Adapter):
    label = "ProcessPoolExecutor"
    stdlib = True

    def open(self):
        from concurrent.futures import ProcessPoolExecutor
        return ProcessPoolExecutor(self.workers, mp_context=self.ctx())

    def map(self, fn, args):
        return list(self.pool.map(fn, args, chunksize=1))

    def roundtrip(self, fn, arg):
        return self.pool.submit(fn, arg).result()


class Mplite(Adapter):
    label = "mplite"
    module = "mplite"

    def open(self):
        import mplite
        self.Task = mplite.Task
        return mplite.TaskManager(cpu_count=self.workers, context=self.method)

    def map(self, fn, args):
        return self.pool.execute([self.Task(fn, a) for a in args], progress=False)

    def roundtrip(self, fn, arg):
        self.pool.submit(self.Task(fn, arg))
        return self.pool.take(timeout=None)

    def version(self):
        import mplite
        return mplite.__version__


class MplitePPE(Mplite):
    label = "mplite.ProcessPoolExecutor"

    def open(self):
        import mplite
        return mplite.ProcessPoolExecutor(self.workers, mp_context=self.ctx())

    map = PPE.map
    roundtrip = PPE.roundtrip


class MpliteLambda(Mplite):
    """mplite with the same tiny task written as a lambda, which travels by value."""
    label = "mplite, lambda task"
    workloads = ("W1", "W6")

    def map(self, fn, args):
        return Mplite.map(self, adder_lambda if fn is adder else fn, args)

    def roundtrip(self, fn, arg):
        return Mplite.roundtrip(self, adder_lambda if fn is adder else fn, arg)


class MpliteBaseline(Mplite):
    """Another mplite.py (say, the last release) beside this one: --baseline-path DIR."""
    label = "mplite baseline"


class _SilentBar:
    def update(self, n=1):
        pass


class Mplite1(Mplite):
    """mplite 1.3.x: execute() draws a tqdm bar unless given a pbar; take() never blocks."""
    label = "mplite 1.x"
    module = "mplite"

    def map(self, fn, args):
        return self.pool.execute([self.Task(fn, a) for a in args], pbar=_SilentBar())

    def roundtrip(self, fn, arg):
        self.pool.submit(self.Task(fn, arg))
        while True:  # busy-poll: the lowest latency this API allows (results here are never None)
            result = self.pool.take()
            if result is not None:
                return result


class Loky(Adapter):
    label = "loky"
    module = "loky"
    replaced_methods = {"fork": "loky"}  # "Cannot use reusable executor with the 'fork' context"

    def open(self):
        import loky
        return loky.get_reusable_executor(max_workers=self.workers, context=self.method)

    map = PPE.map
    roundtrip = PPE.roundtrip

    def version(self):
        import loky
        return loky.__version__


class Pebble(Adapter):
    label = "pebble"
    module = "pebble"

    def open(self):
        import pebble
        return pebble.ProcessPool(max_workers=self.workers, context=self.ctx())

    def map(self, fn, args):
        return list(self.pool.map(fn, args, chunksize=1).result())

    def roundtrip(self, fn, arg):
        if hasattr(self.pool, "submit"):  # pebble >= 5
            return self.pool.submit(fn, None, arg).result()
        return self.pool.schedule(fn, args=[arg]).result()

    def version(self):
        return _dist_version("pebble")


class Mpire(Adapter):
    label = "mpire"
    module = "mpire"

    def open(self):
        import mpire
        return mpire.WorkerPool(n_jobs=self.workers, start_method=self.method, keep_alive=True)

    def map(self, fn, args):
        # mpire unpacks iterable arguments (bytes included): wrap each in a 1-tuple.
        return self.pool.map(fn, [(a,) for a in args], progress_bar=False)

    def roundtrip(self, fn, arg):
        return self.pool.apply(fn, args=(arg,))

    def version(self):
        return _dist_version("mpire")


CONTENDERS = {
    "serial": Serial,
    "Pool.map": PoolMap,
    "Pool.imap": PoolImap,
    "ProcessPoolExecutor": PPE,
    "mplite": Mplite,
    "mplite.PPE": MplitePPE,
    "mplite-lambda": MpliteLambda,
    "mplite-baseline": MpliteBaseline,
    "mplite1": Mplite1,
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

def _timed_map(pool, fn, args):
    """Start and warm up the pool, time one map over args, stop; return (seconds, results)."""
    pool.start()
    try:
        pool.warm_up()
        t0 = time.perf_counter()
        out = pool.map(fn, args)
        seconds = time.perf_counter() - t0
    finally:
        pool.stop()
    return seconds, out


def _check(ok, what):
    if not ok:
        raise AssertionError("wrong results: " + what)


def w1_tiny(pool):
    args = list(range(W1_TASKS))
    seconds, out = _timed_map(pool, adder, args)
    _check(list(out) == [i + 1 for i in args], "W1")
    return {"seconds": seconds}


def _cpu_map(pool, args, what):
    """Time spin() over args; also report the tasks' own CPU seconds (sum and longest)."""
    seconds, out = _timed_map(pool, spin, args)
    _check([n for n, _ in out] == args, what)
    cpu = [c for _, c in out]
    return {"seconds": seconds, "work": sum(cpu), "longest": max(cpu)}


def w2_uniform(pool):
    return _cpu_map(pool, [W2_MS] * W2_TASKS, "W2")


def w3_skewed(pool):
    return _cpu_map(pool, [W3_SHORT_MS] * W3_SHORT + [W3_LONG_MS] * W3_LONG, "W3")


def w4_startup(pool):
    t0 = time.perf_counter()
    pool.start()
    try:
        result = pool.roundtrip(adder, 1)
    finally:
        pool.stop()
    seconds = time.perf_counter() - t0
    _check(result == 2, "W4")
    return {"seconds": seconds}


def w5_payload(pool):
    payload = bytes(W5_BYTES)
    seconds, out = _timed_map(pool, echo, [payload] * W5_TASKS)
    _check(len(out) == W5_TASKS and all(len(b) == W5_BYTES for b in out), "W5")
    return {"seconds": seconds}


def w6_latency(pool):
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


class Workload:
    def __init__(self, key, title, unit, higher_is_better, run, fmt):
        self.key, self.title, self.unit = key, title, unit
        self.higher_is_better, self.run, self.fmt = higher_is_better, run, fmt

    def better(self, a, b):
        return a > b if self.higher_is_better else a < b

    def relative(self, value, best):
        """How many times as good as best (> 1 = better), whichever way the metric runs."""
        return value / best if self.higher_is_better else best / value


WORKLOADS = {w.key: w for w in [
    Workload("W1", "W1 tiny tasks", "tasks/s", True, w1_tiny, "{:,.0f}"),
    Workload("W2", "W2 uniform CPU", "efficiency", True, w2_uniform, "{:.2f}"),
    Workload("W3", "W3 skewed CPU", "makespan/ideal", False, w3_skewed, "{:.2f}"),
    Workload("W4", "W4 start-up", "s", False, w4_startup, "{:.3f}"),
    Workload("W5", "W5 payload", "MB/s", True, w5_payload, "{:,.0f}"),
    Workload("W6", "W6 latency", "\u00b5s/trip", False, w6_latency, "{:,.0f}"),
]}


def child_main(opts):
    if opts.import_path:
        sys.path.insert(0, opts.import_path)
    pool = CONTENDERS[opts.contender](opts.workers, opts.method)
    if pool.module:  # import before any clock starts, as the stdlib pools are imported already
        importlib.import_module(pool.module)
    measured = WORKLOADS[opts.workload].run(pool)
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
    chosen, skipped = {}, []
    for name, cls in CONTENDERS.items():
        if opts.only and name not in opts.only:
            continue
        path = None
        if name in ("mplite", "mplite.PPE", "mplite-lambda"):
            path = opts.mplite_path
        elif name == "mplite-baseline":
            path = opts.baseline_path
            if not path:
                skipped.append("mplite baseline (give --baseline-path DIR)")
                continue
        elif name == "mplite1":
            path = opts.mplite1_path
            if not path:
                skipped.append("mplite 1.x (give --mplite1-path DIR or MPLITE1_PATH)")
                continue
        if cls.module is None:
            chosen[name] = (cls.label, None)
            continue
        version, why = probe(cls.module, path)
        if name == "mplite1" and version and not version.startswith("1."):
            version, why = None, "found mplite %s in %s, not 1.x" % (version, path)
        if version is None:
            skipped.append("%s (%s)" % (cls.label, why))
            continue
        if name == "mplite.PPE":
            label = "mplite %s ProcessPoolExecutor" % version
        elif name == "mplite-baseline":
            label = "mplite %s (baseline)" % version
        elif name == "mplite-lambda":
            label = "mplite %s, lambda task" % version
        elif cls.module == "mplite":
            label = "mplite " + version
        else:
            label = "%s %s" % (cls.label, version)
        chosen[name] = (label, path)
    return chosen, skipped


def run_child(opts, name, path, workload, method):
    """(the child's measurements, None) or (None, error text)."""
    cmd = [sys.executable, SCRIPT, "--child", name, workload, "--method", method,
           "--workers", str(opts.workers)]
    if path:
        cmd += ["--import-path", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.child_timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out after %s s" % opts.child_timeout
    if proc.returncode == 0:
        try:
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            if "seconds" in measured:
                return measured, None
        except (ValueError, IndexError, KeyError):
            pass
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return None, "exit %s: %s" % (proc.returncode, tail)


def metric(key, run, opts):
    """One run's measurements (as a child printed them) -> the workload's metric."""
    seconds = run["seconds"]
    if key == "W1":
        return W1_TASKS / seconds
    if key == "W2":  # serial time = the tasks' own CPU seconds, measured in this run
        return run["work"] / (opts.workers * seconds)
    if key == "W3":
        return seconds / max(run["work"] / opts.workers, run["longest"])
    if key == "W4":
        return seconds
    if key == "W5":
        return 2 * W5_TASKS * W5_BYTES / seconds / 1e6
    if key == "W6":
        return seconds / W6_TRIPS * 1e6
    raise KeyError(key)


def machine_line(opts):
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


def render(opts, chosen, skipped, results, errors, workloads, elapsed, load_before):
    """The Markdown report. results[(name, method, key)] = list of the children's dicts."""
    argv = ["python"] + sys.argv
    lines = [
        "Machine: %s. Command: `%s` (workers=%d, repeats=%d, took %.0f s; load average %s "
        "before, %s after)." % (
            machine_line(opts), " ".join(shlex.quote(a) for a in argv), opts.workers,
            opts.repeat, elapsed, load_before, load_average()),
        "",
    ]
    for method in opts.methods:
        values = {}  # (name, key) -> median of the runs' metric values
        for name in chosen:
            for key in workloads:
                runs = results.get((name, "any" if name == "serial" else method, key))
                if runs:
                    values[(name, key)] = statistics.median(metric(key, r, opts) for r in runs)
        best = {}
        for key in workloads:
            w = WORKLOADS[key]
            for name in STDLIB:
                v = values.get((name, key))
                if v is not None and (key not in best or w.better(v, best[key][1])):
                    best[key] = (name, v)

        lines.append("**start method: %s**" % method)
        lines.append("")
        lines.append("| contender | " + " | ".join(
            "%s, %s %s" % (WORKLOADS[k].title, WORKLOADS[k].unit,
                           "\u2191" if WORKLOADS[k].higher_is_better else "\u2193")
            for k in workloads) + " |")
        lines.append("|---|" + "---:|" * len(workloads))
        for name, (label, _) in chosen.items():
            used = CONTENDERS[name].replaced_methods.get(method)
            if used:
                label += " (start method: %s)" % used
            cells = []
            for key in workloads:
                w = WORKLOADS[key]
                v = values.get((name, key))
                if (name, method, key) in errors or (name, "any", key) in errors:
                    cells.append("error")
                elif v is None:
                    cells.append("\u2014")
                elif name == "serial" or key not in best:
                    cells.append(w.fmt.format(v))
                else:
                    r = w.relative(v, best[key][1])
                    ratio = "%.2f" % r if r >= 0.1 else "%.2g" % r
                    text = "%s (%s\u00d7)" % (w.fmt.format(v), ratio)
                    cells.append("**%s**" % text if best[key][0] == name else text)
            lines.append("| %s | %s |" % (label, " | ".join(cells)))
        lines.append("")
    lines += [
        "Median of %d run(s), each in a fresh process. Bold: the best stdlib pool "
        "(Pool.map, Pool.imap, ProcessPoolExecutor) for that workload; (r\u00d7): performance "
        "relative to it, above 1 = better. \u2191 higher is better, \u2193 lower is better. "
        "W1: 20,000 tiny tasks; W2: 40 x 50 ms CPU, efficiency = the tasks' CPU seconds / (workers "
        "x wall); W3: 56 x 10 ms + 4 x 400 ms last, makespan / max(tasks' CPU seconds / workers, "
        "longest task); W4: start, one task, stop; "
        "W5: 16 x 16 MiB echoed, MB/s both ways; W6: 500 sequential round trips. "
        "Pool.imap W4/W6: same pool as Pool.map. The serial row does not depend on the start "
        "method." % opts.repeat,
    ]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def parent_main(opts):
    started = time.perf_counter()
    workloads = [k for k in WORKLOADS if k in opts.workloads]
    chosen, skipped = available_contenders(opts)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    load_before = load_average()
    if load_before != "n/a" and float(load_before) > 0.5 * os.cpu_count():
        log("warning: load average %s on %d CPUs: other work will skew the numbers"
            % (load_before, os.cpu_count()))
    log("contenders: %s; skipped: %s" % (
        ", ".join(label for label, _ in chosen.values()),
        "; ".join(skipped) or "none"))

    plan = []
    for rep in range(opts.repeat):
        for i, method in enumerate(opts.methods):
            for key in workloads:
                for name, (label, path) in chosen.items():
                    if key not in CONTENDERS[name].workloads:
                        continue
                    if name == "serial" and i > 0:  # no pool: one set of runs serves every method
                        continue
                    plan.append((name, path, "any" if name == "serial" else method, key))

    results, errors = {}, {}
    for n, (name, path, method, key) in enumerate(plan, 1):
        measured, error = run_child(opts, name, path, key, "spawn" if method == "any" else method)
        if error:
            errors[(name, method, key)] = error
            log("[%d/%d] %s %s %s: FAILED %s" % (n, len(plan), method, key, name, error))
        else:
            results.setdefault((name, method, key), []).append(measured)
            log("[%d/%d] %s %s %s: %.4f s" % (n, len(plan), method, key, name,
                                               measured["seconds"]))

    report = render(opts, chosen, skipped, results, errors, workloads,
                    time.perf_counter() - started, load_before)
    print(report)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(report)
    for (name, method, key), error in errors.items():
        log("FAILED %s %s %s: %s" % (method, key, name, error))
    return 1 if errors else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description="mplite benchmark (see the module docstring).")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the median is shown (3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every pool (2)")
    p.add_argument("--methods", default="spawn,fork",
                   help="comma-separated start methods (spawn,fork)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. W1,W6 (all)")
    p.add_argument("--only", default="",
                   help="comma-separated contenders (%s); default: all available" %
                   ", ".join(CONTENDERS))
    p.add_argument("--out", help="also write the Markdown table to this file")
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
    p.add_argument("--import-path", default="", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.methods = [m for m in opts.methods.split(",") if m]
    opts.workloads = [w.upper() for w in opts.workloads.split(",") if w]
    opts.only = [c for c in opts.only.split(",") if c]
    for m in opts.methods:
        if m not in multiprocessing.get_all_start_methods():
            p.error("start method %r is not available here" % m)
    for w in opts.workloads:
        if w not in WORKLOADS:
            p.error("unknown workload %r" % w)
    for c in opts.only:
        if c not in CONTENDERS:
            p.error("unknown contender %r (choose from %s)" % (c, ", ".join(CONTENDERS)))
    if opts.repeat < 1 or opts.workers < 1:
        p.error("--repeat and --workers must be >= 1")
    if opts.child:
        opts.contender, opts.workload = opts.child
    return opts


if __name__ == "__main__":
    options = parse_args(sys.argv[1:])
    if options.child:
        child_main(options)
    else:
        sys.exit(parent_main(options))
