#!/usr/bin/env python3
"""mplite on a dask cluster, against the user's own ``client.map`` and ``client.get_executor()``.

Usage
-----
    /path/to/venv/bin/python benchmarks/dask_bench.py               # 2 workers, 3 repeats
    python benchmarks/dask_bench.py --repeat 1 --workloads W1        # a quick look
    python benchmarks/dask_bench.py --workers 4 --tasks 50000 --out benchmarks/results/dask.md

On a busy 2-core machine dask's scheduler managed a few hundred tasks/s, so each client.map
and executor.map run of W1 took 1-2 minutes there: the default run (3 repeats) takes 15-20
minutes; --tasks 2000 or --only mplite,client.map cut that down.

dask is an optional dependency: this script needs ``distributed`` (pip install distributed)
and exits with a message when it is missing; mplite itself needs neither. Otherwise standard
library only. mplite is imported from the repository root (--mplite-path to change it).

What it measures
----------------
One ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` (--workers)
and one ``Client`` serve every run, as a user's own cluster would. On it, in the same run:

  W1 tiny tasks   --tasks (20,000) x adder(i, 1), which returns i + 1     tasks/s (higher)
                  (and x inc(x) for the one-argument calls)
  W2 uniform CPU  40 x spin(50): 50 ms of pure-Python CPU each, the task   wall seconds (lower)
                  of bench.py's W2                                         and efficiency =
                                                                           CPU s / (workers x wall)

each through
  client.map      ``client.gather(client.map(adder, range(n), [1] * n))``. client.map defaults
                  to pure=True: calls with equal arguments get one key and run once. W1's
                  arguments are all distinct, so W1 keeps that default (and pays for hashing
                  every call, as a user's code would); W2's 40 calls are all spin(50), so W2
                  passes pure=False (else dask would run one task).
  executor.map    ``list(client.get_executor().map(adder, range(n), [1] * n))``; W2:
                  ``client.get_executor(pure=False)``, for the same reason.
  mplite          ``with TaskManager(executor=client.get_executor()) as tm:
                  tm.execute([Task(adder, i, 1) for i in range(n)], progress=False)``, and
                  ``tm.map(inc, xs)``: mplite batches many tasks into one submission. The
                  clock covers the whole ``with`` block. The executor is the default one, as a
                  user would pass it; W2's tasks return a token unique to each execution, and
                  the table shows how many distinct executions came back (40 expected: fewer
                  means dask merged equal submissions).

Until mplite's TaskManager takes ``executor=``, the mplite rows read "n/a (no executor=
support yet)". Runs are interleaved (repeat -> workload -> contender), each contender's runs
start on an idle cluster (the scheduler holds no task), and the tables show medians, with the
ratios against ``client.map`` in the same call shape. Task functions are importable by name in
the workers: adder, inc and spin come from bench.py, and this folder and the repository root
are put on the workers' PYTHONPATH before the cluster starts.
"""

import argparse
import inspect
import logging
import os
import platform
import shlex
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

W1_TASKS = 20000
W2_TASKS, W2_MS = 40, 50


def spin_tagged(ms):
    """bench.spin(ms), plus a token unique to this execution: (ms, CPU seconds, token)."""
    from bench import spin
    ms, cpu = spin(ms)
    return ms, cpu, os.urandom(8).hex()


def _scheduler_tasks(dask_scheduler=None):
    return len(dask_scheduler.tasks)


def _worker_imports():
    import bench  # noqa: F401  the tasks' module
    import dask_bench  # noqa: F401
    try:
        import mplite  # noqa: F401
    except ImportError:
        pass
    return sys.path[:3]


# ----------------------------------------------------------------------------------------------
# Contenders: run(workload, client) -> (seconds, results); W1 checks, W2 reports.

class Contender:
    key = ""
    label = ""
    shape = "2"  # W1's call shape: "2" (adder(i, 1)) or "1" (inc(x))
    calls = {}

    def missing(self):
        return None


class ClientMap(Contender):
    key, label = "client.map", "client.map + gather"
    calls = {"W1": "client.gather(client.map(adder, range(n), [1] * n))",
             "W2": "client.gather(client.map(spin, [50] * 40, pure=False))"}

    def w1(self, client, n, tasks):
        futures = client.map(tasks.adder, range(n), [1] * n)
        out = client.gather(futures)
        del futures
        return out

    def w2(self, client, args, tasks):
        futures = client.map(tasks.spin_tagged, args, pure=False)
        out = client.gather(futures)
        del futures
        return out


class ClientMap1(ClientMap):
    key, label, shape = "client.map-1", "client.map + gather, 1 argument", "1"
    calls = {"W1": "client.gather(client.map(inc, xs))"}

    def w1(self, client, xs, tasks):
        futures = client.map(tasks.inc, xs)
        out = client.gather(futures)
        del futures
        return out


class ExecutorMap(Contender):
    key, label = "executor.map", "client.get_executor().map"
    calls = {"W1": "list(client.get_executor().map(adder, range(n), [1] * n))",
             "W2": "list(client.get_executor(pure=False).map(spin, [50] * 40))"}

    def w1(self, client, n, tasks):
        return list(client.get_executor().map(tasks.adder, range(n), [1] * n))

    def w2(self, client, args, tasks):
        return list(client.get_executor(pure=False).map(tasks.spin_tagged, args))


class MpliteExecute(Contender):
    key, label = "mplite", "mplite execute"
    calls = {"W1": "tm.execute([Task(adder, i, 1) for i in range(n)], progress=False)",
             "W2": "tm.execute([Task(spin, 50) for _ in range(40)], progress=False)"}

    def missing(self):
        import mplite
        if "executor" not in inspect.signature(mplite.TaskManager).parameters:
            return "no executor= support yet"
        return None

    def manager(self, client):
        import mplite
        return mplite.TaskManager(executor=client.get_executor())

    def w1(self, client, n, tasks):
        from mplite import Task
        with self.manager(client) as tm:
            return tm.execute([Task(tasks.adder, i, 1) for i in range(n)], progress=False)

    def w2(self, client, args, tasks):
        from mplite import Task
        with self.manager(client) as tm:
            return tm.execute([Task(tasks.spin_tagged, a) for a in args], progress=False)


class MpliteMap(MpliteExecute):
    key, label, shape = "mplite.map", "mplite tm.map", "1"
    calls = {"W1": "tm.map(inc, xs)", "W2": "tm.map(spin, [50] * 40)"}

    def w1(self, client, xs, tasks):
        with self.manager(client) as tm:
            return tm.map(tasks.inc, xs)

    def w2(self, client, args, tasks):
        with self.manager(client) as tm:
            return tm.map(tasks.spin_tagged, args)


CONTENDERS = [ClientMap(), ClientMap1(), ExecutorMap(), MpliteExecute(), MpliteMap()]
REFERENCE = {"2": "client.map", "1": "client.map-1"}  # W1's ratios: against client.map, same shape


# ----------------------------------------------------------------------------------------------

def wait_idle(client, timeout=60):
    """Wait until the scheduler holds no task: no results left over, nothing running."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_scheduler_tasks) and time.monotonic() < deadline:
        time.sleep(0.05)


def measure(contender, workload, client, opts, tasks):
    """One run: {"seconds": ..., ...} after checking the results."""
    wait_idle(client)
    if workload == "W1":
        n = opts.tasks
        arg = n if contender.shape == "2" else list(range(n))
        t0 = time.perf_counter()
        out = contender.w1(client, arg, tasks)
        seconds = time.perf_counter() - t0
        if len(out) != n or any(r != i + 1 for i, r in enumerate(out)):
            raise AssertionError("W1: wrong results from %s" % contender.label)
        return {"seconds": seconds, "tasks": n}
    args = [W2_MS] * W2_TASKS
    t0 = time.perf_counter()
    out = contender.w2(client, args, tasks)
    seconds = time.perf_counter() - t0
    if [r[0] for r in out] != args:
        raise AssertionError("W2: wrong results from %s" % contender.label)
    return {"seconds": seconds, "work": sum(r[1] for r in out),
            "executions": len({r[2] for r in out})}


def render(opts, contenders, runs, missing, errors, elapsed, versions):
    med = {}
    for (key, workload), rs in runs.items():
        med[(key, workload)] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    lines = ["Machine: %d CPUs, %s %s, %s; %s. Command: `%s` (dask workers=%d, threads per "
             "worker=1, processes; repeats=%d; took %.0f s)." % (
                 os.cpu_count(), platform.python_implementation(), platform.python_version(),
                 platform.platform(), versions,
                 " ".join(shlex.quote(a) for a in ["python"] + sys.argv),
                 opts.workers, opts.repeat, elapsed), ""]

    def problem(c, workload):
        if c.key in missing:
            return "n/a (%s)" % missing[c.key]
        if (c.key, workload) in errors:
            return "error"
        return None if (c.key, workload) in med else "\u2014"

    if "W1" in opts.workloads:
        lines += ["*W1: %s tiny tasks (adder(i, 1), or inc(x) for the 1-argument calls)*"
                  % format(opts.tasks, ","), "",
                  "| contender | call | tasks/s \u2191 | \u00d7 client.map (same shape) |",
                  "|---|---|---:|---:|"]
        for c in contenders:
            p = problem(c, "W1")
            if p:
                cells = [p, p]
            else:
                v = med[(c.key, "W1")]
                rate = v["tasks"] / v["seconds"]
                ref = med.get((REFERENCE[c.shape], "W1"))
                ratio = "%.2f\u00d7" % (rate / (ref["tasks"] / ref["seconds"])) if ref else "\u2014"
                cells = ["{:,.0f}".format(rate), ratio]
            lines.append("| %s | `%s` | %s |" % (c.label, c.calls["W1"], " | ".join(cells)))
        lines.append("")
    if "W2" in opts.workloads:
        lines += ["*W2: %d x spin(%d), %d ms of CPU each*" % (W2_TASKS, W2_MS, W2_MS), "",
                  "| contender | call | wall s \u2193 | efficiency \u2191 | wall / client.map's "
                  "\u2193 | distinct executions |", "|---|---|---:|---:|---:|---:|"]
        ref = med.get(("client.map", "W2"))
        for c in contenders:
            if "W2" not in c.calls:
                continue
            p = problem(c, "W2")
            if p:
                cells = [p] * 4
            else:
                v = med[(c.key, "W2")]
                cells = ["%.3f" % v["seconds"],
                         "%.2f" % (v["work"] / (opts.workers * v["seconds"])),
                         "%.2f\u00d7" % (v["seconds"] / ref["seconds"]) if ref else "\u2014",
                         "%d of %d" % (v["executions"], W2_TASKS)]
            lines.append("| %s | `%s` | %s |" % (c.label, c.calls["W2"], " | ".join(cells)))
        lines.append("")
    targets = []
    w1_m, w1_c = med.get(("mplite", "W1")), med.get(("client.map", "W1"))
    if w1_m and w1_c:
        r = (w1_m["tasks"] / w1_m["seconds"]) / (w1_c["tasks"] / w1_c["seconds"])
        targets.append(("W1: mplite execute \u2265 10\u00d7 client.map's tasks/s", "%.1f\u00d7" % r,
                        r >= 10))
    w2_m, w2_c = med.get(("mplite", "W2")), med.get(("client.map", "W2"))
    if w2_m and w2_c:
        r = w2_m["seconds"] / w2_c["seconds"]
        targets.append(("W2: mplite execute's wall within 10 % of client.map's", "%.2f\u00d7" % r,
                        r <= 1.10 and w2_m["executions"] == W2_TASKS))
    if targets:
        lines += ["*Targets (issue 10)*", "", "| target | measured | met |", "|---|---:|---|"]
        lines += ["| %s | %s | %s |" % (t, m, "yes" if ok else "**no**") for t, m, ok in targets]
        lines.append("")
    lines.append(
        "Median of %d run(s) on one cluster, each started on an idle scheduler. client.map keeps "
        "its default pure=True in W1 (all arguments distinct: nothing merged) and takes "
        "pure=False in W2 (40 equal calls); mplite's clock includes entering and leaving its "
        "`with TaskManager(executor=client.get_executor())` block. Efficiency: the tasks' CPU "
        "seconds / (workers x wall). Distinct executions: W2 tasks whose result token is unique "
        "(fewer than %d: dask ran equal submissions once)." % (opts.repeat, W2_TASKS))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description="mplite on dask (see the module docstring).")
    p.add_argument("--workers", type=int, default=2, help="dask worker processes (2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; medians are shown (3)")
    p.add_argument("--tasks", type=int, default=W1_TASKS, help="W1's task count (%d)" % W1_TASKS)
    p.add_argument("--workloads", default="W1,W2", help="W1, W2 or both (W1,W2)")
    p.add_argument("--only", default="", help="comma-separated contenders (%s); default: all"
                   % ", ".join(c.key for c in CONTENDERS))
    p.add_argument("--mplite-path", default=REPO_ROOT,
                   help="folder holding the mplite to test (default: the repository root)")
    p.add_argument("--out", help="also write the Markdown tables to this file")
    opts = p.parse_args(argv)
    opts.workloads = [w.strip().upper() for w in opts.workloads.split(",") if w.strip()]
    if not opts.workloads or set(opts.workloads) - {"W1", "W2"}:
        p.error("--workloads takes W1, W2 or W1,W2")
    opts.only = [c for c in opts.only.split(",") if c]
    unknown = set(opts.only) - {c.key for c in CONTENDERS}
    if unknown:
        p.error("unknown contender(s) %s" % ", ".join(sorted(unknown)))
    if opts.workers < 1 or opts.repeat < 1 or opts.tasks < 1:
        p.error("--workers, --repeat and --tasks must be >= 1")
    return opts


def main(argv):
    opts = parse_args(argv)
    try:
        import distributed
    except ImportError:
        sys.exit("dask_bench.py needs dask's `distributed` package (pip install distributed); "
                 "mplite itself does not.")
    # The workers are spawned processes: they find bench.py, this file and mplite.py through
    # PYTHONPATH, set before the cluster starts.
    paths = [HERE, os.path.abspath(opts.mplite_path)]
    sys.path[:0] = [p for p in paths if p not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    import bench  # noqa: F401  (the tasks' module, by its importable name)
    import dask_bench as tasks  # this file again, under a name the workers can import
    tasks.adder, tasks.inc = bench.adder, bench.inc
    import mplite

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    contenders = [c for c in CONTENDERS if not opts.only or c.key in opts.only]
    missing = {c.key: c.missing() for c in contenders if c.missing()}
    versions = "distributed %s, mplite %s" % (distributed.__version__, mplite.__version__)
    log("%s; mplite from %s" % (versions, os.path.dirname(mplite.__file__)))
    for key, why in missing.items():
        log("%s: n/a (%s)" % (key, why))

    started = time.perf_counter()
    runs, errors = {}, {}
    with distributed.LocalCluster(n_workers=opts.workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(opts.workers)
        client.run(_worker_imports)
        client.gather(client.map(bench.adder, range(100), pure=False))  # warm up
        plan = [(rep, w, c) for rep in range(opts.repeat) for w in opts.workloads
                for c in contenders if c.key not in missing and w in c.calls]
        for i, (rep, workload, c) in enumerate(plan, 1):
            try:
                measured = measure(c, workload, client, opts, tasks)
            except Exception as e:  # noqa: BLE001  reported in the table and the exit status
                errors[(c.key, workload)] = "%s: %s" % (type(e).__name__, e)
                log("[%d/%d] %s %s: FAILED %s" % (i, len(plan), workload, c.key,
                                                  errors[(c.key, workload)]))
                continue
            runs.setdefault((c.key, workload), []).append(measured)
            log("[%d/%d] %s %s: %.3f s" % (i, len(plan), workload, c.key, measured["seconds"]))
    report = render(opts, contenders, runs, missing, errors, time.perf_counter() - started, versions)
    print(report)
    if opts.out:
        with open(opts.out, "w", encoding="utf-8") as f:
            f.write(report)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
