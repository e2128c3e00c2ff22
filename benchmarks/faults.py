#!/usr/bin/env python3
"""What happens when a task misbehaves? multiprocessing.Pool vs ProcessPoolExecutor vs mplite.

    python benchmarks/faults.py [--method fork|spawn|forkserver] [--out FILE]

For every fault in FAULTS and every pool in POOLS this script starts a fresh
child process (this file again, with --child) in its own session.  The child
starts a pool of 4 workers, submits 8 tasks of which task #2 is faulty, and
reports as JSON lines on stdout:

  * what the caller got for the faulty task (exception, returned value, or no
    result within --hang-after seconds),
  * which of the other 7 results arrived,
  * whether a second small map on the same pool works, fails or hangs,
  * how shutting the pool down went.

Every blocking call runs in a watchdog thread, so one hang does not hide the
next step; on top of that the whole child runs under a hard timeout, after
which its process group is killed.  After the child has gone, any process left
in its group is reported and killed.  Fault 9 (Ctrl-C) sends SIGINT to the
child's process group, as a terminal would, while all workers are busy.

The result is a Markdown table (rows = faults, columns = pools) on stdout and
in --out FILE.  Standard library only; mplite is imported from the repository
root.
"""
import argparse
import collections
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)

WORKERS = 4          # pool size
N_TASKS = 8          # tasks per batch
FAULTY = 2           # index of the faulty task
TASK_S = 0.3         # how long a healthy task takes
SLOW_S = 5.0         # how long the "too slow" task takes
TASK_TIMEOUT = 1.0   # the timeout the caller gives the slow task
CTRL_C_TASK_S = 20.0  # how long each task of the Ctrl-C batch would take
CTRL_C_EXIT_S = 5.0   # the caller should be gone this long after Ctrl-C
CTRL_C_KILL_S = CTRL_C_TASK_S + 10  # ... and is killed if not gone after this long
STARTUP_S = 60.0     # how long the pool may take to start
EVENT = "@@faults "  # prefix of the child's JSON lines on stdout
WORKDIR_ENV = "MPLITE_FAULTS_WORKDIR"


def _workdir():
    return os.environ[WORKDIR_ENV]


# --------------------------------------------------------------------------
# The faults.  Each action runs inside a worker, as the body of task #FAULTY.
# --------------------------------------------------------------------------

class BadInitError(Exception):
    """An exception that pickles but can't be rebuilt from its args."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def _sigkill():
    os.kill(os.getpid(), signal.SIGKILL)


def _segfault():
    import ctypes
    ctypes.string_at(0)


def _os_exit():
    os._exit(3)


def _sys_exit():
    sys.exit(0)


def _slow():
    with open(os.path.join(_workdir(), "slow.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(SLOW_S)
    open(os.path.join(_workdir(), "slow.done"), "w").close()
    return FAULTY + 100


def _unpicklable_result():
    return threading.Lock()


def _unpicklable_arg():
    return FAULTY + 100  # the fault is the extra argument, see task_args()


def _bad_exception():
    raise BadInitError(1, 2)


def _ctrl_c(i=0):
    # every task of the Ctrl-C batch: say "running", then take long
    open(os.path.join(_workdir(), "running-%d-%d" % (os.getpid(), i)), "w").close()
    time.sleep(CTRL_C_TASK_S)


Fault = collections.namedtuple("Fault", "key label action")
FAULTS = [
    Fault("sigkill", "1. worker killed mid-task (SIGKILL)", _sigkill),
    Fault("segfault", "2. segfault (`ctypes.string_at(0)`)", _segfault),
    Fault("os_exit", "3. `os._exit(3)`", _os_exit),
    Fault("sys_exit", "4. `sys.exit(0)` in the task", _sys_exit),
    Fault("timeout", "5. task too slow for a 1 s timeout", _slow),
    Fault("bad_result", "6. unpicklable return value (a Lock)", _unpicklable_result),
    Fault("bad_arg", "7. unpicklable argument (a Lock)", _unpicklable_arg),
    Fault("bad_exception", "8. exception that can't be rebuilt from its args", _bad_exception),
    Fault("ctrl_c", "9. Ctrl-C in the parent while tasks run", _ctrl_c),
]
FAULT_BY_KEY = {f.key: f for f in FAULTS}


def job(i, fault, *extra):
    """The task: healthy ones sleep a little and return i + 100."""
    if fault == "ctrl_c":
        return _ctrl_c(i)
    if i != FAULTY:
        time.sleep(TASK_S)
        return i + 100
    time.sleep(0.1)  # let the others get going first
    return FAULT_BY_KEY[fault].action()


def task_args(i, fault):
    if fault == "bad_arg" and i == FAULTY:
        return (i, fault, threading.Lock())
    return (i, fault)


def probe(x):
    """The second, small map that tells whether the pool still works."""
    return x * x


def warm(x):
    """Run once per worker before the test, so that start-up time doesn't count."""
    time.sleep(0.2)
    return x


PROBE_IN = list(range(4))
PROBE_OUT = [probe(x) for x in PROBE_IN]


# --------------------------------------------------------------------------
# One small adapter per pool: start, submit, results, map, shutdown.
# --------------------------------------------------------------------------

def call_with_deadline(calls, seconds, t0=None):
    """Run each zero-argument callable of `calls` (a dict) in its own daemon
    thread; wait for them at most `seconds` in total.  Returns
    {key: (kind, value, elapsed)} with kind "value", "raised" or "hang"."""
    t0 = time.monotonic() if t0 is None else t0
    done = {}

    def runner(key, fn):
        try:
            done[key] = ("value", fn(), time.monotonic() - t0)
        except BaseException as e:  # SystemExit and KeyboardInterrupt included
            done[key] = ("raised", e, time.monotonic() - t0)

    threads = [threading.Thread(target=runner, args=item, daemon=True) for item in calls.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {key: done.get(key, ("hang", None, None)) for key in calls}


class FutureLikeAdapter:
    """Shared by Pool and ProcessPoolExecutor: one handle per task, waited on
    by one thread per task, so a lost task doesn't block the others.  The
    task timeout (fault 5) is the caller's: it waits that long for the slow task."""

    def __init__(self, ctx, task_timeout):
        self.task_timeout = task_timeout

    def results(self, handles, hang_after, t0):
        calls = {}
        for i, h in handles.items():
            timeout = self.task_timeout if i == FAULTY else None
            calls[i] = (lambda h=h, timeout=timeout: self.wait(h, timeout))
        return call_with_deadline(calls, hang_after, t0)


class PoolAdapter(FutureLikeAdapter):
    title = "multiprocessing.Pool"

    def __init__(self, ctx, task_timeout):
        super().__init__(ctx, task_timeout)
        self.pool = ctx.Pool(WORKERS)

    def submit(self, fn, args):
        return self.pool.apply_async(fn, args)

    def wait(self, handle, timeout):
        return handle.get(timeout=timeout)

    def map(self, fn, xs):
        return self.pool.map(fn, xs)

    def starmap(self, fn, arglists):
        return self.pool.starmap(fn, arglists)

    def shutdown(self):
        self.pool.terminate()  # what `with Pool() as p:` does on exit


class ExecutorAdapter(FutureLikeAdapter):
    title = "ProcessPoolExecutor"

    def __init__(self, ctx, task_timeout):
        super().__init__(ctx, task_timeout)
        self.ex = ProcessPoolExecutor(max_workers=WORKERS, mp_context=ctx)

    def submit(self, fn, args):
        return self.ex.submit(fn, *args)

    def wait(self, handle, timeout):
        return handle.result(timeout=timeout)

    def map(self, fn, xs):
        return list(self.ex.map(fn, xs))

    def starmap(self, fn, arglists):
        return list(self.ex.map(fn, *zip(*arglists)))

    def shutdown(self):
        self.ex.shutdown(wait=True)  # what `with ProcessPoolExecutor() as ex:` does on exit


class MpliteAdapter:
    """submit() + as_completed(); the task timeout (fault 5) is the manager's."""
    title = "mplite"
    error_mode = "exception"

    def __init__(self, ctx, task_timeout):
        sys.path.insert(0, REPO_ROOT)
        import mplite
        self.mplite = mplite
        self.tm = mplite.TaskManager(cpu_count=WORKERS, context=ctx.get_start_method(),
                                     error_mode=self.error_mode, timeout=task_timeout)
        self.tm.start()

    def submit(self, fn, args):
        return self.tm.submit(self.mplite.Task(fn, *args))

    def results(self, handles, hang_after, t0):
        # as_completed() names the task of each result, but not the task of an
        # exception; with one faulty task, exceptions go to the tasks left over.
        index_of = {task_id: i for i, task_id in handles.items()}
        got, errors = {}, []

        def drain():
            while self.tm.open_tasks and len(errors) <= N_TASKS:
                try:
                    for task, result in self.tm.as_completed():
                        got[index_of[task.id]] = ("value", result, time.monotonic() - t0)
                except BaseException as e:  # SystemExit from a task's sys.exit() too
                    errors.append(("raised", e, time.monotonic() - t0))

        finished = call_with_deadline({"drain": drain}, hang_after, t0)["drain"]
        if finished[0] == "raised":
            errors.append(finished)
        missing = sorted(set(handles) - set(got), key=lambda i: i != FAULTY)
        for i, err in zip(missing, errors):
            got[i] = err
        return {i: got.get(i, ("hang", None, None)) for i in handles}

    def map(self, fn, xs):
        return self.tm.map(fn, xs)

    def starmap(self, fn, arglists):
        return self.tm.execute([self.mplite.Task(fn, *a) for a in arglists], progress=False)

    def shutdown(self):
        self.tm.stop()


class MpliteExecuteAdapter(MpliteAdapter):
    """mplite's main call: execute() with the default error_mode="str"."""
    title = "mplite `execute()`, error_mode='str'"
    error_mode = "str"

    def submit(self, fn, args):
        return self.mplite.Task(fn, *args)  # sent by execute(), in results()

    def results(self, handles, hang_after, t0):
        order = sorted(handles)
        run = lambda: self.tm.execute([handles[i] for i in order], progress=False)
        kind, value, elapsed = outcome = call_with_deadline({"execute": run}, hang_after, t0)["execute"]
        if kind == "value":
            return {i: ("value", v, elapsed) for i, v in zip(order, value)}
        return {i: outcome for i in order}  # raised or hung: the same for all


POOLS = {"pool": PoolAdapter, "ppe": ExecutorAdapter, "mplite": MpliteAdapter,
         "mplite-execute": MpliteExecuteAdapter}
DEFAULT_POOLS = ["pool", "ppe", "mplite"]


# --------------------------------------------------------------------------
# The child: one pool, one fault.
# --------------------------------------------------------------------------

def emit(step, **data):
    print(EVENT + json.dumps(dict(step=step, **data)), flush=True)


def short(text, limit=70):
    """First line of `text`, at most `limit` characters, pids and addresses masked."""
    text = " ".join(str(text).strip().splitlines()[:1]).strip()
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", re.sub(r"\bpid \d+", "pid N", text))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def elide(text, limit=64):
    """Keep the first and the last words of `text`: the end often says the most."""
    if len(text) <= limit:
        return text
    head = text[:limit // 3].rsplit(" ", 1)[0]
    tail = text[-(limit * 2 // 3):]
    tail = tail.split(" ", 1)[-1] if " " in tail else tail
    return head + " … " + tail


def as_json(outcome, expected=None):
    kind, value, elapsed = outcome
    d = {"kind": kind, "t": None if elapsed is None else round(elapsed, 2)}
    if kind == "raised":
        d.update(type=type(value).__name__, msg=short(value, 300))
    elif kind == "value":
        if isinstance(value, str) and value.startswith("Traceback (most recent call last):"):
            d.update(kind="traceback_text", last=short(value.rstrip().splitlines()[-1], 300))
        else:
            d.update(repr=short(repr(value), 40), ok=value == expected)
    return d


def pid_alive(pid):
    """True if the process exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def child_main(pool_key, fault_key, method, hang_after):
    ctx = multiprocessing.get_context(method)
    task_timeout = TASK_TIMEOUT if fault_key == "timeout" else None
    try:
        adapter = POOLS[pool_key](ctx, task_timeout)
    except Exception as e:
        emit("setup", error="%s: %s" % (type(e).__name__, short(e)))
        return
    # 0. wait until the workers are up: spawning them can take long on a busy machine
    up = call_with_deadline({"warm": lambda: adapter.map(warm, range(WORKERS))}, STARTUP_S)["warm"]
    if up[0] != "value":
        emit("setup", error="the pool doesn't start: " + phrase(as_json(up), STARTUP_S))
        return
    if fault_key == "ctrl_c":
        return child_ctrl_c(adapter)

    # 1. submit 8 tasks, one faulty
    t0 = time.monotonic()
    handles, at_submit = {}, {}
    for i in range(N_TASKS):
        try:
            handles[i] = adapter.submit(job, task_args(i, fault_key))
        except Exception as e:
            at_submit[i] = dict(as_json(("raised", e, time.monotonic() - t0)), at="submit")
    # 2. wait for the results
    outcomes = adapter.results(handles, hang_after, t0)
    report = {str(i): as_json(o, i + 100) for i, o in outcomes.items()}
    report.update({str(i): o for i, o in at_submit.items()})
    emit("results", outcomes=report)
    pid_file = os.path.join(_workdir(), "slow.pid")
    if fault_key == "timeout" and os.path.exists(pid_file):
        with open(pid_file) as f:
            emit("slow", alive_after_timeout=pid_alive(int(f.read())))
    # 3. is the pool still usable?
    reuse = call_with_deadline({"map": lambda: adapter.map(probe, PROBE_IN)}, hang_after)["map"]
    emit("reuse", outcome=as_json(reuse, PROBE_OUT))
    # 4. shut it down
    down = call_with_deadline({"down": adapter.shutdown}, hang_after)["down"]
    emit("shutdown", outcome=as_json(down))
    if fault_key == "timeout":
        emit("slow_after_shutdown", finished=os.path.exists(os.path.join(_workdir(), "slow.done")))
    emit("done")
    if down[0] == "hang":
        os._exit(0)  # reported already; don't wait for the hard timeout at exit too


def child_ctrl_c(adapter):
    emit("ready")
    try:
        adapter.starmap(job, [task_args(i, "ctrl_c") for i in range(N_TASKS)])
        emit("finished")
    except BaseException as e:  # KeyboardInterrupt, one hopes
        emit("interrupted", type=type(e).__name__, at=time.time())
    finally:
        adapter.shutdown()  # as a with-block would
    emit("done")


# --------------------------------------------------------------------------
# The parent: run every (fault, pool) pair in its own session.
# --------------------------------------------------------------------------

def group_members(pgid):
    """Live (non-zombie) processes of process group `pgid`."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return ["?"]
        except (ProcessLookupError, PermissionError):
            return []
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_group_empty(pgid, seconds):
    deadline = time.monotonic() + seconds
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return group_members(pgid)


RUNNING = set()  # process groups of the children still running
RUNNING_LOCK = threading.Lock()
STOPPING = threading.Event()  # set on Ctrl-C: start no more children


def run_case(fault, pool_key, opts):
    """Run one (fault, pool) pair in a child process; return what was seen."""
    workdir = tempfile.mkdtemp(prefix="mplite-faults-")
    env = dict(os.environ, **{WORKDIR_ENV: workdir})
    cmd = [sys.executable, os.path.abspath(__file__), "--child", pool_key, fault.key,
           "--method", opts.method, "--hang-after", str(opts.hang_after)]
    hard_timeout = STARTUP_S + 3 * opts.hang_after + 15
    case = {"fault": fault.key, "pool": pool_key, "hard_timeout": hard_timeout}
    t0 = time.monotonic()
    with open(os.path.join(workdir, "out"), "w") as out, open(os.path.join(workdir, "err"), "w") as err, \
            RUNNING_LOCK:
        if STOPPING.is_set():
            shutil.rmtree(workdir, ignore_errors=True)
            raise KeyboardInterrupt
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        RUNNING.add(proc.pid)
    try:
        deadline = t0 + hard_timeout
        if fault.key == "ctrl_c":
            case["ctrl_c"] = send_ctrl_c(proc, workdir)
            deadline = time.monotonic()  # it had its time
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            case["killed"] = False
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            case["killed"] = True
        case["rc"] = proc.returncode
        case["elapsed"] = time.monotonic() - t0
        case["left_behind"] = len(wait_group_empty(proc.pid, 2.0))
    finally:
        with RUNNING_LOCK:
            kill_group(proc.pid)
            RUNNING.discard(proc.pid)
        case["events"] = read_events(os.path.join(workdir, "out"))
        with open(os.path.join(workdir, "err"), errors="replace") as f:
            case["stderr"] = f.read()
        shutil.rmtree(workdir, ignore_errors=True)
    return case


def send_ctrl_c(proc, workdir):
    """Wait until every worker runs a task, then Ctrl-C the child's whole
    process group, as a terminal would; wait for the child to exit."""
    def started():
        return [name for name in os.listdir(workdir) if name.startswith("running-")]

    deadline = time.monotonic() + STARTUP_S + 10
    while len(started()) < WORKERS:
        if proc.poll() is not None or time.monotonic() > deadline:
            return {"sent": False}
        time.sleep(0.05)
    time.sleep(0.2)
    n_started, sent_at = len(started()), time.time()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=CTRL_C_KILL_S)
        exit_s = time.time() - sent_at
    except subprocess.TimeoutExpired:
        exit_s = None  # run_case kills it
    return {"sent": True, "sent_at": sent_at, "exit_s": exit_s,
            "started_after": len(started()) - n_started}


def read_events(path):
    events = {}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(EVENT):
                ev = json.loads(line[len(EVENT):])
                events[ev.pop("step")] = ev
    return events


# --------------------------------------------------------------------------
# From measurements to table cells.
# --------------------------------------------------------------------------

def phrase(o, hang_after, brief=False):
    """What the caller got, in a few words; `brief`: just the kind of it."""
    kind = o["kind"]
    if kind == "raised":
        if brief:
            return o["type"]
        text = o["type"] + (": " + elide(o["msg"]) if o["msg"] else "")
        return text + (" (raised by submit)" if o.get("at") == "submit" else "")
    if kind == "traceback_text":
        return "traceback text" if brief else 'traceback text "%s"' % elide(o["last"], 80)
    if kind == "value":
        return "wrong value" if brief else "returns %s" % o["repr"]
    return "hang" if brief else "hangs (no result after %g s)" % hang_after


def others_phrase(outcomes, hang_after):
    others = [o for i, o in outcomes.items() if i != str(FAULTY)]
    ok = [o for o in others if o["kind"] == "value" and o.get("ok")]
    text = "%d/%d others ok" % (len(ok), len(others))
    bad = collections.Counter(phrase(o, hang_after, brief=True) for o in others if o not in ok)
    if bad:
        text += " (%s)" % ", ".join("%d× %s" % (n, p) for p, n in bad.items())
    return text


def pool_phrase(reuse, hang_after):
    if reuse["kind"] == "value":
        return "pool ok" if reuse["ok"] else "pool gives wrong results (%s)" % reuse["repr"]
    if reuse["kind"] == "hang":
        return "pool hangs"
    return "pool unusable (%s)" % phrase(reuse, hang_after, brief=True)


def describe(case, opts):
    ev, parts = case["events"], []
    if "setup" in ev:
        return "n/a: " + ev["setup"]["error"]
    if "results" in ev:
        outcomes = ev["results"]["outcomes"]
        faulty = outcomes[str(FAULTY)]
        text = phrase(faulty, opts.hang_after)
        if case["fault"] == "timeout" and faulty.get("t") is not None:
            text += " after %.1f s" % faulty["t"]
        parts += [text, others_phrase(outcomes, opts.hang_after)]
    down = ev.get("shutdown", {}).get("outcome", {})
    if "slow" in ev:
        if not ev["slow"]["alive_after_timeout"]:
            parts.append("the worker is killed")
        elif ev.get("slow_after_shutdown", {}).get("finished") and down.get("kind") == "value":
            parts.append("the worker runs on; shutdown waits %.0f s for it" % down["t"])
            down = {}
        else:
            parts.append("the worker runs on until shutdown kills it")
    if "reuse" in ev:
        parts.append(pool_phrase(ev["reuse"]["outcome"], opts.hang_after))
    if down.get("kind") == "hang":
        parts.append("shutdown hangs")
    elif down.get("kind") == "raised":
        parts.append("shutdown raises %s: %s" % (down["type"], elide(down["msg"])))
    elif down.get("t", 0) > 5:
        parts.append("shutdown takes %.0f s" % down["t"])
    if case["killed"]:
        where = "at exit" if "done" in ev else "after '%s'" % (list(ev) or ["start"])[-1]
        parts.append("process hangs %s (killed after %d s)" % (where, case["hard_timeout"]))
    elif "done" not in ev:
        parts.append("caller process dies (exit code %s)" % case["rc"])
    if case["left_behind"]:
        parts.append("%d processes left behind" % case["left_behind"])
    return "; ".join(parts)


def describe_ctrl_c(case):
    """A list of phrases in fixed slots: exception, exit, queued tasks, stderr, survivors."""
    info, ev = case.get("ctrl_c", {}), case["events"]
    if not info.get("sent"):
        return ["tasks never started (exit code %s)" % case["rc"]]

    def when(seconds):  # coarse, so that runs of the same behaviour read the same
        if seconds < 1 or seconds < CTRL_C_EXIT_S:
            return "within %g s" % (1 if seconds < 1 else CTRL_C_EXIT_S)
        return "after ~%d s" % (5 * round(seconds / 5))

    if "interrupted" in ev:
        caught = "%s %s" % (ev["interrupted"]["type"], when(ev["interrupted"]["at"] - info["sent_at"]))
    else:
        caught = "no exception in the caller"
    if info["exit_s"] is None:
        exits = "caller hangs (killed %g s after Ctrl-C)" % CTRL_C_KILL_S
    elif info["exit_s"] > CTRL_C_EXIT_S:
        exits = "doesn't exit within %g s (exits %s)" % (CTRL_C_EXIT_S, when(info["exit_s"]))
    else:
        exits = "exits " + when(info["exit_s"])
    queued = "queued tasks still start" if info["started_after"] else ""
    tracebacks = case["stderr"].count("Traceback (most recent call last)")
    noise = "tracebacks on stderr" if tracebacks else "quiet stderr"
    left = "" if case["killed"] else (
        "%d processes survive" % case["left_behind"] if case["left_behind"] else "no process survives")
    return [caught, exits, queued, noise, left]


def describe_runs(cases, opts):
    """One cell for one or more runs of the same case; where runs differ, say how often."""
    if cases[0]["fault"] != "ctrl_c":
        return describe(cases[0], opts)
    slots = zip(*(describe_ctrl_c(case) for case in cases))
    parts = []
    for texts in map(collections.Counter, slots):
        if len(texts) == 1:
            parts.append(next(iter(texts)))
        else:
            parts.append(" or ".join("%s (%d of %d runs)" % (t or "not", n, len(cases))
                                     for t, n in texts.most_common()))
    return "; ".join(p for p in parts if p)


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning|Pool)(: .*)?$")


def stderr_summary(text):
    """The distinct exception lines (e.g. "TypeError: ...") on stderr."""
    found = []
    for line in text.splitlines():
        if EXCEPTION_LINE.match(line) and short(line, 120) not in found:
            found.append(short(line, 120))
    if not found and text.strip():
        n = text.count("Traceback (most recent call last)")
        found.append("%d tracebacks cut short" % n if n else short(text.strip().splitlines()[-1], 120))
    return found[:3]


def md(text):
    return str(text).replace("|", "\\|")


def render(results, pools, opts, header):
    out = [header, ""]
    out.append("| fault | " + " | ".join(POOLS[p].title for p in pools) + " |")
    out.append("|---" * (len(pools) + 1) + "|")
    for fault in opts.faults:
        cells = [md(describe_runs(results[fault.key, p], opts)) for p in pools]
        out.append("| %s | %s |" % (fault.label, " | ".join(cells)))
    out += ["", "Notes:", "",
            "- %d workers, %d tasks, task #%d faulty; healthy tasks take %.1f s. "
            "Pool: `apply_async` + `AsyncResult.get()`; ProcessPoolExecutor: `submit` + "
            "`Future.result()`; mplite: `submit` + `as_completed()` with `error_mode=\"exception\"` "
            "(with the default `error_mode=\"str\"` the failed task's result is the traceback text "
            "instead; `--pools pool,ppe,mplite,mplite-execute` adds a column for that, with `execute()`)."
            % (WORKERS, N_TASKS, FAULTY, TASK_S),
            "- \"pool ok\": a second `map(probe, range(4))` on the same pool returns the right results.",
            "- Fault 5: Pool and ProcessPoolExecutor wait with `get(timeout=1)` / `result(timeout=1)`; "
            "mplite uses `TaskManager(timeout=1)`. The slow task takes %g s." % SLOW_S,
            "- Fault 9: SIGINT to the caller's process group (as a terminal's Ctrl-C) once all %d workers "
            "run a %g s task of 8 (Pool: `starmap`, ProcessPoolExecutor: `map`, mplite: `execute`), inside "
            "`try/finally: <shut the pool down>`, %d runs each. \"survives\": still alive 2 s after the caller "
            "has exited." % (WORKERS, CTRL_C_TASK_S, opts.ctrl_c_runs),
            "- A hang is \"no result after %g s\" inside the caller; the caller itself is killed "
            "(whole process group) if it outlives a hard timeout." % opts.hang_after]
    stderr = {key: "".join(run["stderr"] for run in runs) for key, runs in results.items()}
    noisy = [(f, p) for f in opts.faults for p in pools if stderr[f.key, p].strip()]
    if noisy:
        out += ["", "What the caller's stderr showed (distinct exception lines):", ""]
        for f, p in noisy:
            out.append("- %s, %s: %s" % (f.label, POOLS[p].title,
                                          " / ".join("`%s`" % x for x in stderr_summary(stderr[f.key, p]))))
    return "\n".join(out) + "\n"


def mplite_version():
    sys.path.insert(0, REPO_ROOT)
    try:
        import mplite
        return "mplite %s" % getattr(mplite, "__version__", "?")
    except Exception as e:
        return "mplite not importable (%s: %s)" % (type(e).__name__, short(e))
    finally:
        sys.path.remove(REPO_ROOT)


def parse_args(argv):
    methods = multiprocessing.get_all_start_methods()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=methods, default="fork" if "fork" in methods else "spawn",
                    help="start method for all three pools (default: fork where available)")
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    ap.add_argument("--hang-after", type=float, default=10.0, metavar="S",
                    help="a blocking call that hasn't returned after S seconds counts as a hang (default 10)")
    ap.add_argument("--pools", default=",".join(DEFAULT_POOLS),
                    help="comma-separated, from: %s (default: %%(default)s)" % ", ".join(POOLS))
    ap.add_argument("--faults", default="all", help="comma-separated fault keys: %s" % ", ".join(FAULT_BY_KEY))
    ap.add_argument("--ctrl-c-runs", type=int, default=3, metavar="N",
                    help="run the Ctrl-C case N times, it can be racy (default 3)")
    ap.add_argument("--jobs", type=int, default=0, help="cases run at once (default: all)")
    ap.add_argument("--json", metavar="FILE", help="write the raw measurements to FILE")
    ap.add_argument("--child", nargs=2, metavar=("POOL", "FAULT"), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    opts.faults = FAULTS if opts.faults == "all" else [FAULT_BY_KEY[k] for k in opts.faults.split(",")]
    opts.pools = opts.pools.split(",")
    for p in opts.pools:
        if p not in POOLS:
            ap.error("unknown pool %r" % p)
    return opts


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    if opts.child:
        return child_main(opts.child[0], opts.child[1], opts.method, opts.hang_after)
    # children must start with the default SIGINT disposition, even if this
    # script runs in a background job that ignores SIGINT
    signal.signal(signal.SIGINT, signal.default_int_handler)
    header = "Python %s (%s), start method `%s`, %s, %s" % (
        platform.python_version(), platform.platform(terse=True), opts.method,
        mplite_version(), time.strftime("%Y-%m-%d"))
    cases = [(f, p) for f in opts.faults for p in opts.pools
             for _ in range(opts.ctrl_c_runs if f.key == "ctrl_c" else 1)]
    t0 = time.monotonic()
    results = collections.defaultdict(list)
    print("running %d cases..." % len(cases), file=sys.stderr, flush=True)
    ex = ThreadPoolExecutor(max_workers=opts.jobs or len(cases))
    futures = {ex.submit(run_case, f, p, opts): (f, p) for f, p in cases}
    try:
        for fut, (f, p) in futures.items():
            results[f.key, p].append(fut.result())
    finally:  # on Ctrl-C: cancel what hasn't started, kill what has
        with RUNNING_LOCK:
            STOPPING.set()
            for pgid in RUNNING:
                kill_group(pgid)
        ex.shutdown(wait=True)
    print("(%d cases in %.0f s)" % (len(cases), time.monotonic() - t0), file=sys.stderr)
    report = render(results, opts.pools, opts, header)
    print(report)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(report)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([c for runs in results.values() for c in runs], f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every child's process group is killed already
        sys.exit("interrupted")
