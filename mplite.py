"""mplite: a process pool in one file, whose tasks can't crash it.

    from mplite import TaskManager, Task

    def add(a, b=0):
        return a + b

    if __name__ == "__main__":
        with TaskManager() as tm:
            print(tm.execute([Task(add, i, b=1) for i in range(5)]))   # [1, 2, 3, 4, 5]
            print(tm.map(add, [1, 2, 3]))                               # [1, 2, 3]; imap(): lazily
            tm.submit(Task(add, 40, 2))
            print(tm.take(timeout=None))                                # 42

A task that raises, kills its worker or runs past its ``timeout`` gets the error as its result; the others run
on. Task functions may be lambdas or closures: what the workers can't import travels by value. Any number of
threads may use a pool at once. Code written for ``concurrent.futures`` or asyncio gets the same engine from
``ProcessPoolExecutor``; ``TaskManager(executor=...)`` runs tasks on another executor (dask's, say).

The file reads top down: the public API; the engine (a diagram at its head), its worker processes and the
wire; the foreign-executor backend; functions by value; the portable path; errors and helpers; the progress
bar; the self-test (``python -m mplite``). Standard library only, Python 3.8+, Linux, macOS, Windows. MIT.
"""
import atexit
import contextlib
import builtins
import functools
import importlib
import io
import itertools
import linecache
import marshal
import os
import pickle
import reprlib
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
import weakref
from collections import deque
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from itertools import repeat
from math import ceil
from multiprocessing import Pipe, forkserver, get_context, get_all_start_methods, resource_tracker
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext
from multiprocessing.heap import Arena
from multiprocessing.reduction import ForkingPickler
from operator import add, attrgetter, is_, rshift

__version__ = "3.0.0"
__all__ = ["Task", "TaskChain", "TaskManager", "ProcessPoolExecutor", "UnpicklableTaskError", "WorkerDiedError"]

# Durations are measured with perf_counter: monotonic() ticks every 15.6 ms on Windows before
# Python 3.13, and tiny tasks would measure as taking no time at all.
_now = time.perf_counter


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

_ids = itertools.count(1)
_id_lock = threading.Lock()
_task_func = attrgetter("func")  # a Task's parts, as a partial's: read in C, for the engine
_task_args = attrgetter("args")
_task_keywords = attrgetter("keywords")
_DEFAULT = object()  # "not given": lets execute(timeout=None) mean "no limit for this call"


class Task(functools.partial):
    """A function call to run in a worker: ``Task(f, *args, **kwargs)``, with a unique ``id``. A
    functools.partial, so built in C at half the cost of a class of our own: users make millions."""
    __slots__ = ("_id",)

    # The parts under the names mplite 1.x gave them (args is a partial's own), read-only.
    f = property(attrgetter("func"))
    kwargs = property(attrgetter("keywords"))

    @property
    def id(self):
        """A number unique to this task, drawn when first asked for (in 1.x: at creation)."""
        if not hasattr(self, "_id"):
            with _id_lock:
                if not hasattr(self, "_id"):  # another thread may have drawn it meanwhile
                    self._id = next(_ids)
        return self._id

    @classmethod
    def _of(cls, f, args, kwargs, id=None, attributes=None):
        """A Task of f(*args, **kwargs), as pickled: see __reduce__."""
        task = cls.__new__(cls, f, *args, **kwargs)
        if id is not None:
            task._id = id
        if attributes:
            task.__dict__.update(attributes)
        return task

    def __repr__(self):
        return f"Task(f={_name(self.func)}, *{self.args!r}, **{self.keywords!r})"

    def __reduce__(self):  # a copy keeps the id and attributes; a subclass may take other arguments
        return type(self)._of, (self.func, self.args, self.keywords, self.id,
                                getattr(self, "__dict__", None) or None)

    def execute(self):
        """Run the task here, in this process; exceptions propagate."""
        return self()


class TaskChain:
    """A task whose result decides what runs next, like a promise.

    ``next_task(prev_task, result)`` returns the next ``Task`` or ``TaskChain``, or None to end the chain with
    ``result``, which ``execute`` puts in the chain's place. ``next_task`` runs in the parent, on whichever
    thread runs the engine then, so it must not wait for results itself; a waiting chain blocks nothing else.
    """

    def __init__(self, task, next_task=None):
        if not isinstance(task, Task):
            raise TypeError(f"TaskChain needs a Task, not {type(task).__name__}")
        if next_task is not None and not callable(next_task):
            raise TypeError(f"next_task must be callable or None, not {next_task!r}")
        self.id = task.id
        self.task = task
        self.next = next_task

    def __repr__(self):
        t = self.task
        return f"TaskChain(f={_name(t.f)}, *{t.args!r}, **{t.kwargs!r}, is_last={self.next is None})"

    def execute(self):
        """Run the whole chain here, in this process, and return the result of its last task."""
        step = self
        while isinstance(step, TaskChain):
            result = step.task.execute()
            step = _next_step(step, result)
        return result if step is None else step.execute()


class TaskManager:
    """A pool of worker processes that runs Tasks; use it as a context manager, or call start() and stop().

    cpu_count: number of workers (default: the CPUs this process may use).
    context: "spawn" (the default, also for None), "fork", "forkserver" or a multiprocessing context.
    worker_init: a Task run once in every worker before it takes work.
    error_mode: "str" (a failed task's result is its traceback's text) or "exception" (raised, traceback and all).
    timeout: seconds a task may run; past them its worker is replaced and its result is a TimeoutError.
    max_tasks_per_child: replace each worker after this many tasks (for leaky code).
    executor: a concurrent.futures.Executor to run the tasks on instead (README: "Past one machine"); stop()
        leaves it running. cpu_count is then how many batches run at once (default: its max_workers).
    """

    def __init__(self, cpu_count=None, context="spawn", worker_init=None, error_mode="str",
                 *, timeout=None, max_tasks_per_child=None, executor=None):
        if executor is not None:
            if not isinstance(executor, futures.Executor):
                raise TypeError(f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}")
            if worker_init is not None or max_tasks_per_child is not None:
                raise ValueError("worker_init and max_tasks_per_child work on mplite's own workers only; "
                                 "an executor has its own (say, ProcessPoolExecutor's initializer)")
            if cpu_count is None:
                cpu_count = _executor_slots(executor)
        if worker_init is not None and not isinstance(worker_init, Task):
            raise TypeError(f"worker_init must be a Task or None, not {type(worker_init).__name__}")
        if error_mode not in ("str", "exception"):
            raise ValueError(f"error_mode must be 'str' or 'exception', not {error_mode!r}")
        self._ctx, self._cpu_count, self.timeout, self.max_tasks_per_child = _settings(
            context, cpu_count, "cpu_count", timeout, max_tasks_per_child)
        self._executor = executor
        self.worker_init = worker_init
        self.error_mode = error_mode
        self._engine = None
        self._lock = threading.Lock()  # guards _engine: start() and stop() come from any thread

    def __repr__(self):
        state = "running" if self._engine else "stopped"
        where = self._ctx.get_start_method() if self._executor is None else f"on {type(self._executor).__name__}"
        return f"<TaskManager cpu_count={self._cpu_count} {where} {state}>"

    cpu_count = property(attrgetter("_cpu_count"), doc="How many workers (on an executor: batches at once).")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Start the workers. With a worker_init, wait until every worker has run it (one that
        fails raises here); without one, return at once: tasks go to workers as they come up."""
        with self._lock:
            engine = self._engine
            if engine is None or engine.closed:
                backend = (_Processes(self._ctx, self.worker_init, self.max_tasks_per_child, "worker_init")
                           if self._executor is None else _ExecutorBackend(self._executor))
                engine = _Engine(backend, self._cpu_count)
                engine.start()
                self._engine = engine
                self._finalizer = weakref.finalize(self, engine.close)  # a manager dropped unstopped
        if self.worker_init is not None:
            try:
                self._wait(engine, engine.ready)
                engine.raise_if_broken()  # a failing worker_init raises here
            except BaseException:
                self._stop(0, engine)
                raise

    def stop(self):
        """Stop the workers; unfinished tasks are dropped, and calls waiting for them in other
        threads raise RuntimeError. Safe to call twice, or after errors."""
        self._stop(1.0)

    def _stop(self, grace, engine=None):
        with self._lock:
            if self._engine is None or (engine is not None and engine is not self._engine):
                return  # stopped already, maybe restarted since: not ours to stop
            engine, self._engine = self._engine, None
            self._finalizer.detach()
        engine.close(grace)

    def execute(self, tasks, tqdm=None, pbar=None, *, progress=True, timeout=_DEFAULT):
        """Run tasks (Task or TaskChain) and return their results in input order. progress: show a progress
        bar on stderr; tqdm: a tqdm-compatible class to draw it instead; pbar: an object with update(n) to
        report to instead. timeout: seconds per task for this call (default: the manager's timeout)."""
        engine = self._running()
        call = _Call(*_task_list(tasks), *self._options(timeout))
        _check_functions(call.distinct_tasks(), engine.backend.forked_main)
        return self._call(engine, call, tqdm, pbar, progress)

    def map(self, f, iterable, *, progress=False, timeout=_DEFAULT):
        """``execute([Task(f, x) for x in iterable])``: the results of f(x), in order."""
        engine = self._running(f)
        return self._call(engine, _Mapped(list(iterable), *self._options(timeout), f), None, None, progress)

    def imap(self, f, iterable, *, timeout=_DEFAULT):
        """map() as an iterator: the results of f(x), in order, as they come. The input is read a little ahead
        of the results taken: it may be endless. Closing the iterator (or leaving a for loop over it) drops the
        tasks not yet taken. An error raised by the input is raised after the results of the items before it."""
        engine = self._running(f)
        engine.refuse_inside_turn()
        # Read ahead: a few tasks per worker, more as results are taken, up to a bound.
        limit, least = 4096 * self._cpu_count, 4 * self._cpu_count  # the README's promise
        stream = _Stream(engine, f, False, iter(iterable), self._options(timeout)[0],
                         lambda taken: min(limit, max(least, taken)))
        return stream.results(lambda call: self._wait(engine, call.done), self._failed)

    def _options(self, timeout):
        """(timeout, errors) of a call: its timeout, or the manager's; what becomes of a failure."""
        return (self.timeout if timeout is _DEFAULT else _checked(timeout, "timeout"),
                _RAISE if self.error_mode == "exception" else _TEXT)

    def _call(self, engine, call, tqdm, pbar, progress):
        bar = _progress_bar(len(call.items), tqdm, pbar, progress and bool(call.items))
        if not call.items:
            return []
        engine.refuse_inside_turn()  # before its work is queued: nobody would wait for it
        try:
            engine.put(_Job(call, 0, len(call.items)), ring=False)
            while not self._wait(engine, call.done, None if bar is None else _REDRAW_SECONDS):
                call.report(bar)
            if bar is not None:
                call.report(bar)
        finally:
            if bar is not None and pbar is None:
                bar.close()
        if call.failure is not None:
            raise call.failure.exception()
        return call.results

    def _failed(self, failure):
        """What takes a failed task's place: its traceback's text; or, in "exception" mode, it is raised."""
        if self.error_mode == "exception":
            raise failure.exception()
        return failure.text

    def submit(self, task, *, timeout=_DEFAULT):
        """Queue a Task or TaskChain to run; returns its id. Collect it with take() or as_completed()."""
        engine = self._running()
        if not isinstance(task, (Task, TaskChain)):
            raise TypeError(f"submit takes a Task or TaskChain, not {type(task).__name__}")
        timeout = self._options(timeout)[0]
        payload = engine.backend.payload(_entry_task(task))
        inbox = engine.inbox
        inbox.opened(1)
        try:
            engine.put(_Job(_Submitted(task, timeout, inbox), 0, 1, payload), ring=False)
        except BaseException:
            inbox.opened(-1)
            raise
        try:
            engine.send_now()
        except KeyboardInterrupt:  # as in a wait: the pool stops at once
            self._stop(0, engine)
            raise
        return task.id

    def take(self, timeout=0):
        """One finished result of a submitted task, or None if none is ready. timeout=0 returns at once; a number
        waits up to that many seconds; None waits until a result is ready (None at once if no task is open)."""
        timeout = _checked(timeout, "timeout", zero_ok=True)
        finished = self._wait(self._running(), None, timeout)
        if finished is not None and finished is not _TIMED_OUT:
            _, ok, value = finished
            return value if ok else self._failed(value)

    def as_completed(self, timeout=None):
        """Yield (task, result) for each submitted task as it finishes, until none is open.
        timeout: seconds for the whole iteration; past it, TimeoutError is raised."""
        timeout = _checked(timeout, "timeout")
        return self._completed(self._running(), timeout)

    def _completed(self, engine, timeout):
        deadline = None if timeout is None else _now() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - _now())
            finished = self._wait(engine, None, left)
            if finished is None:
                return
            if finished is _TIMED_OUT:
                raise TimeoutError(f"{engine.inbox.open} submitted tasks did not finish within {timeout} s")
            item, ok, value = finished
            yield item, (value if ok else self._failed(value))

    @property
    def open_tasks(self):
        """Tasks submitted and not yet taken."""
        engine = self._engine
        return 0 if engine is None else engine.inbox.open

    def _running(self, f=None):
        """The running engine; f: a function to map, refused here if it can't travel to the workers."""
        engine = self._engine
        if engine is None:
            raise RuntimeError("the TaskManager is not running: use `with TaskManager() as tm:` or call start()")
        if engine.closed:
            raise engine.refusal()
        if f is not None:
            _check_functions([_mappable(f)], engine.backend.forked_main)
        return engine

    def _wait(self, engine, event, timeout=None):
        """Wait via the engine for an Event, or (None) for the inbox's next task. Ctrl-C stops the pool at once."""
        try:
            if event is None:
                return engine.inbox.get(engine, timeout)
            return engine.wait(event.is_set, event.wait, timeout)
        except KeyboardInterrupt:
            self._stop(0, engine)
            raise


class ProcessPoolExecutor(futures.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on mplite's engine: change one import.

    With mplite's guarantees: a task that kills its worker fails only its own future (with WorkerDiedError,
    a BrokenProcessPool); one past ``timeout`` seconds fails with TimeoutError, its worker replaced; a future's
    exception carries the worker's traceback. mp_context=None means spawn; map's chunksize is ignored
    (batching is automatic). A future is running once assigned to a worker: until then it can be cancelled.
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, timeout=None):
        if isinstance(max_workers, int) and not isinstance(max_workers, bool) and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")  # the standard library's words
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._mp_context, self._max_workers, self._timeout, max_tasks = _settings(
            mp_context, max_workers, "max_workers", timeout, max_tasks_per_child)
        init = None if initializer is None else Task(initializer, *initargs)
        self._engine = _Engine(_Processes(self._mp_context, init, max_tasks, "initializer"), self._max_workers,
                               drain_at_exit=True)
        self._shutdown_lock = threading.Lock()
        self._shut = threading.Event()  # shutdown() was called; what map() streams check, not self
        self._engine.start()  # the workers start in the background; submit() may come at once
        # Dropped without shutdown(): finish, then stop. Nothing the engine or a map() holds refers back here.
        weakref.finalize(self, self._engine.close, 1.0, True, False)

    @property
    def _broken(self):
        """Why the pool broke (a failing initializer), or False: as the standard library's."""
        failure = self._engine.failure
        return False if failure is None else str(failure)

    def submit(self, fn, /, *args, **kwargs):
        with self._shutdown_lock:
            _refuse_after(self._shut)
            if self._engine.closed and self._engine.failure is None:  # stopped at the interpreter's exit
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future = _Future(self._engine)
            self._engine.put(_Job(_FutureTask(future, Task._of(fn, args, kwargs), self._timeout), 0, 1), ring=False)
        self._engine.send_now()  # not under the lock: callbacks that submit again may run here
        return future

    submit.__doc__ = futures.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Like ``map(fn, *iterables)``, each call run in a worker; results in order, lazily. timeout: seconds
        from this call for the whole iteration. buffersize: at most this many calls sent ahead of the results
        taken (None: all at once; as Python 3.14's)."""
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or isinstance(buffersize, bool)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else _now() + timeout
        engine = self._engine
        _refuse_after(self._shut)
        _check_functions([_mappable(fn)], engine.backend.forked_main)
        # Calls travel in chunks (_Mapped), not a Future each: all at once, as the standard library's, or buffersize.
        star = len(iterables) != 1  # one iterable: f(x), with no tuple made for each x
        stream = _Stream(engine, fn, star, zip(*iterables) if star else iter(iterables[0]), self._timeout,
                         lambda taken: buffersize or sys.maxsize, functools.partial(_refuse_after, self._shut))
        stream.top_up()
        if buffersize is None and stream.error is not None:
            engine.drop(stream.calls)
            raise stream.error

        def wait(call):
            left = None if deadline is None else max(0.0, deadline - _now())
            if not engine.wait(call.done.is_set, call.done.wait, left):
                raise futures.TimeoutError()

        return stream.results(wait, _raise_remote)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """No more submit(); pending futures still run (unless cancel_futures), then the workers
        stop. wait: return only once that is done."""
        with self._shutdown_lock:
            self._shut.set()
        if cancel_futures:
            with contextlib.suppress(RuntimeError):  # closed meanwhile (a BrokenProcessPool too): nothing waits
                self._engine.put(self._engine.cancel_pending)
        self._engine.close(1.0, drain=True, wait=wait)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is KeyboardInterrupt:  # Ctrl-C: stop at once, leave no process behind
            self.shutdown(wait=False, cancel_futures=True)
            self._engine.close(0)
        else:
            self.shutdown(wait=True)


def _settings(context, size, size_name, timeout, max_tasks):
    """The settings TaskManager and ProcessPoolExecutor share, checked: (context, size, timeout, max_tasks)."""
    context = "spawn" if context is None else context
    if not isinstance(context, (str, BaseContext)):
        raise TypeError(f"context must be a start method name or a multiprocessing context, not {context!r}")
    if isinstance(context, str):
        if context not in get_all_start_methods():
            raise ValueError(f"context must be one of {get_all_start_methods()}, not {context!r}")
        context = get_context(context)
    return (context, _checked(_usable_cpus() if size is None else size, size_name, int),
            _checked(timeout, "timeout"), _checked(max_tasks, "max_tasks_per_child", int))


def _refuse_after(shut):
    if shut.is_set():
        raise RuntimeError("cannot schedule new futures after shutdown")


def _raise_remote(failure):
    """As the standard library's executor: the worker's traceback as text in __cause__."""
    raise failure.exception(remote=True)


class UnpicklableTaskError(TypeError, pickle.PicklingError):
    """A task whose function or arguments can't travel to a worker, even by value: a lock, an open file, an
    instance of a class typed into a notebook. Lambdas and closures can."""


class WorkerDiedError(ChildProcessError, BrokenProcessPool):
    """A task's worker died while running it (killed, crashed, os._exit()): only that task fails. A
    ChildProcessError, as in mplite 1.x, and a BrokenProcessPool, as concurrent.futures expects."""


# ---------------------------------------------------------------------------------------------
# Owners: what callers wait on, which the engine fills in
#
# Every piece of work belongs to an owner: an execute() or map() call (_Call), a chunk of a stream (_Mapped),
# a submitted task (_Submitted: its result goes to the inbox) or a future (_FutureTask). The engine calls
# claim() before it sends a task, deliver(slot, ok, value) for each finished one (a failure's value is a
# _Failure; deliver_results for a run of plain results) and stopped(error) for work that will never finish.
# The owner alone decides what a failure becomes. Callers wait through _Engine.wait(), and nothing else.
# ---------------------------------------------------------------------------------------------

_TIMED_OUT = object()
# What user code can raise while its task is pickled, unpickled or chained, to fail that task
# alone (SystemExit too: a __reduce__ that calls sys.exit() must not stop mplite's engine).
_TASK_ERRORS = (Exception, SystemExit)
_REDRAW_SECONDS = 0.1  # how often a waiting execute() redraws its progress bar
_STREAM_CHUNK = 4096   # the most tasks a streamed map's chunk holds
# What a _Call does with a failure: its text takes its place, the call raises it, or it stays there.
_TEXT, _RAISE, _KEEP = "text", "raise", "keep"


class _Owner:
    __slots__ = ()
    plain = False      # results go straight in: deliver_results()
    cancelled = False  # it wants no more results
    key = None         # the timing key of all its tasks, if one
    streaming = False  # a stream's chunk whose input may go on: the queue's end is not the work's

    def task(self, slot):
        """The Task that runs next for a slot (errors name it)."""
        return _entry_task(self.items[slot])

    def run(self, start, stop):
        """The tasks of slots start..stop as they travel: a run of a message (see _callable)."""
        return None, False, [_entry(item) for item in self.items[start:stop]]

    def key_of(self, slot):
        return self.key or _timing_key(self.task(slot).func)

    def claim(self):
        return True

    def cancel(self, start, stop):
        """shutdown(cancel_futures=True) before these slots were sent: True if they are done with."""
        return False

    def deliver_results(self, start, values):  # an owner of one task
        self.deliver(start, True, values[0])

    def stopped(self, error):
        pass


class _Call(_Owner):
    """One execute() call: its tasks, their results in input order, and how many are to come."""
    __slots__ = ("items", "results", "left", "timeout", "errors", "plain", "f", "key",
                 "failure", "kept", "cancelled", "shown", "done")

    def __init__(self, items, kinds, timeout, errors, f=None):
        self.items = items  # what runs next: a Task, or a TaskChain's current step
        self.results = [None] * len(items)
        self.left = len(items)
        self.timeout = timeout
        self.errors = errors
        self.plain = f is not None or kinds == {Task}  # no chains: results go straight in
        one = f is not None or (self.plain and items and _one_function(items))
        self.key = _timing_key(f or items[0].func) if one and items else None
        if f is None and one and not any(map(_task_keywords, items)):
            f = items[0].func
        self.f = f  # the one function of all tasks (no keywords), or None
        self.failure = None
        self.kept = False  # a failure is kept among the results (_KEEP)
        self.cancelled = False
        self.shown = 0
        self.done = threading.Event()

    def run(self, start, stop):
        if self.f is None:
            return _Owner.run(self, start, stop)
        return self.f, True, list(map(_task_args, self.items[start:stop]))

    def distinct_tasks(self):
        if self.key is not None:
            return [self.task(0)] if self.items else []
        return {id(task.func): task for task in map(_entry_task, self.items)}.values()

    def deliver_results(self, start, values):
        if not self.cancelled:
            self.results[start:start + len(values)] = values
            self.left -= len(values)
            if not self.left:
                self.done.set()

    def deliver(self, slot, ok, value):
        if not (ok or self.cancelled):
            if self.errors == _KEEP:
                self.kept = True
            elif self.errors == _RAISE or value.refused:  # refused: it can't even be sent, bad input
                return self.abort(value)
            else:
                value = value.text
        self.deliver_results(slot, [value])

    def abort(self, failure):
        self.failure = failure
        self.cancelled = True
        self.done.set()

    def cancel(self, start, stop):
        failure = _Failure.of(futures.CancelledError())
        for slot in range(start, stop):
            self.deliver(slot, False, failure)
        return True

    def stopped(self, error):
        if not self.done.is_set():
            self.abort(_Failure.of(type(error)(*error.args)))  # each waiting call raises its own

    def report(self, bar):
        done = len(self.results) - self.left
        if done > self.shown:
            bar.update(done - self.shown)
            self.shown = done


class _Mapped(_Call):
    """One map() call, or a chunk of a streamed one: f(x) (star: f(*x)) for each x, no Task each."""
    __slots__ = ("star", "streaming")

    def __init__(self, items, timeout, errors, f, star=False, streaming=False):
        super().__init__(items, None, timeout, errors, f)
        self.star = star
        self.streaming = streaming

    def task(self, slot):
        return _run_task(self.run(slot, slot + 1), 0)

    def run(self, start, stop):
        return self.f, self.star, self.items[start:stop]


class _Stream:
    """The results of imap() or ProcessPoolExecutor.map(), in order. The input goes in _Mapped chunks,
    at most window(taken) inputs ahead of the results taken."""

    def __init__(self, engine, f, star, inputs, timeout, window, may_send=lambda: None):
        self.engine = engine
        self.may_send = may_send  # raises if a chunk may not go
        self.f, self.star, self.timeout = f, star, timeout
        self.inputs = inputs  # None once it is exhausted
        self.window = window
        self.calls = deque()  # chunks sent and not yet taken, in input order
        self.taken = 0        # results taken
        self.ahead = 0        # inputs read and not yet taken
        self.error = None     # what the input raised, after the items before it

    def top_up(self, ring=True):
        """Send chunks of the input until the window is full (ring: see _Engine.put)."""
        window = self.window(self.taken)
        while self.error is None and self.inputs is not None and self.ahead < window:
            # Chunks double from one task up to a quarter of the window (_STREAM_CHUNK at most): the
            # first results come soon, and a consumer that stops early leaves little run for nothing.
            # Only whole chunks: filling each gap as it opens would keep chunks as small as the last taken.
            size = min(max(1, window // 4), _STREAM_CHUNK, max(1, self.taken + self.ahead))
            if window - self.ahead < size:
                break
            chunk = []
            try:
                chunk.extend(itertools.islice(self.inputs, size))
            except Exception as exc:  # the items read before it are in the chunk
                self.error = exc
            if not chunk:
                self.inputs = None
                # The input ended with the last chunk: its queue's end is the work's.
                if self.calls:
                    self.calls[-1].streaming = False
                break
            self.may_send()
            call = _Mapped(chunk, self.timeout, _KEEP, self.f, self.star, len(chunk) == size)
            self.engine.put(_Job(call, 0, len(chunk)), ring)
            self.calls.append(call)
            self.ahead += len(chunk)

    def results(self, wait, raise_error):
        """wait(call) waits for a chunk; raise_error(failure) raises, or returns what takes its place.
        A result is let go once yielded: the caller alone decides how long it lives."""
        calls = self.calls
        try:
            while True:
                self.top_up(False)  # this caller runs the turn next, in wait()
                if not calls:
                    if self.error is not None:
                        raise self.error
                    return
                call = calls[0]
                wait(call)
                if call.failure is not None:  # the pool stopped, or a task can't be sent
                    raise call.failure.exception()
                calls.popleft()
                results, call.results = call.results, None
                self.ahead -= len(results)
                self.taken += len(results)
                results.reverse()  # popped from the end: each goes as it is yielded
                if not call.kept:  # no failure among them: no Python step a result
                    yield from map(list.pop, repeat(results, len(results)))
                    continue
                while results:  # no local name for a result: it would outlive its yield
                    if results[-1].__class__ is _Failure:
                        yield raise_error(results.pop())
                    else:
                        yield results.pop()
        finally:
            if calls:  # left early: drop the rest
                self.engine.drop(calls)


class _Submitted(_Owner):
    """One submit()ted task: its result goes to the pool's inbox, for take()."""
    __slots__ = ("item", "items", "timeout", "inbox", "plain", "key")

    def __init__(self, item, timeout, inbox):
        self.item = item  # what was submitted (items[0] follows its chain)
        self.items = [item]
        self.timeout = timeout
        self.inbox = inbox
        self.plain = item.__class__ is Task  # no chain to go on with
        self.key = _timing_key(item.func) if self.plain else None

    def deliver(self, slot, ok, value):
        self.inbox.put((self.item, ok, value))


class _Inbox:
    """Finished submitted tasks, until take() or as_completed() hands each to one caller."""

    def __init__(self):
        self.ready = threading.Condition()  # an RLock: get() calls opened()
        self.finished = deque()  # (item, ok, value)
        self.open = 0            # submitted and not yet taken
        self.error = None        # why no more will come: the pool stopped

    def opened(self, n):
        with self.ready:
            self.open += n
            if not self.open:  # those waiting for more get None: nothing is open
                self.ready.notify_all()

    def put(self, finished):
        with self.ready:
            self.finished.append(finished)
            self.ready.notify()

    def has_news(self):
        return bool(self.finished) or not self.open or self.error is not None

    def sleep(self, seconds):
        with self.ready:
            self.ready.wait_for(self.has_news, seconds)

    def get(self, engine, timeout):
        """The next finished task; None if no task is open; _TIMED_OUT after timeout seconds."""
        deadline = None if timeout is None else _now() + timeout
        while True:
            with self.ready:
                if self.finished:
                    self.opened(-1)
                    return self.finished.popleft()
                if self.error is not None:
                    raise RuntimeError(self.error)
                if not self.open:
                    return None
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                return _TIMED_OUT
            engine.wait(self.has_news, self.sleep, left)

    def close(self, error):
        with self.ready:
            self.error = str(error)
            self.finished.clear()
            self.open = 0
            self.ready.notify_all()


class _Future(futures.Future):
    """The executor's futures, whose result() and exception() wait through _Engine.wait (no hand-off)."""

    def __init__(self, engine):
        super().__init__()
        self._engine = engine

    def _sleep(self, seconds):
        with self._condition:
            self._condition.wait_for(self.done, seconds)

    def result(self, timeout=None):
        self._engine.wait(self.done, self._sleep, timeout)
        return super().result(0)

    def exception(self, timeout=None):
        self._engine.wait(self.done, self._sleep, timeout)
        return super().exception(0)


class _FutureTask(_Owner):
    """One ProcessPoolExecutor.submit(): its result settles its future."""
    __slots__ = ("future", "items", "timeout", "key", "claimed")
    plain = True

    def __init__(self, future, task, timeout):
        self.future = future
        self.items = [task]
        self.timeout = timeout
        self.key = _timing_key(task.func)
        self.claimed = None  # True once running, False if it was cancelled first

    def claim(self):
        if self.claimed is None:  # else back in the queue: its worker died first
            self.claimed = self.future.set_running_or_notify_cancel()
        return self.claimed

    def cancel(self, start, stop):
        return self.claimed is not True and self.future.cancel()

    def deliver(self, slot, ok, value):
        if ok:
            return self._settle(self.future.set_result, value)
        self._settle(self.future.set_exception, value.exception(remote=True))

    def stopped(self, error):
        if not isinstance(error, BrokenProcessPool):
            error = BrokenProcessPool(str(error))
        self._settle(self.future.set_exception, type(error)(*error.args))

    def _settle(self, how, value):
        with contextlib.suppress(futures.InvalidStateError):  # cancelled by its owner meanwhile
            how(value)


# ---------------------------------------------------------------------------------------------
# The engine
#
# How a task travels, with the thread that runs each step:
#
#  [caller]  execute() / map() / imap() / submit() / ProcessPoolExecutor.submit()
#               │ put(_Job): onto `requests`, under a lock; the wake-up pipe rings a sleeper
#               ▼
#  [turn]    requests ─► pending_work_items ─► take_batch() ─► a _Message
#               ├─ _Processes:  pickled ─► the worker's pipe; [worker process] runs each task,
#               │     journals its answer, sends the answers down the pipe ─► [turn] reads them
#               └─ _ExecutorBackend:  executor.submit(_run_remote, batch); [executor's thread]
#                     the future is done ─► put(command) ─► [turn]
#               ▼
#  [turn]    deliver(): each answer to its owner; a TaskChain's next step goes back in the queue
#               ▼
#  [caller]  the owner (a _Call's Event, the inbox, a Future) is done: its caller returns
#
# A backend owns where tasks run: _Processes (mplite's workers) or _ExecutorBackend (any
# executor). The engine calls its start(), payload(), dispatch(), running(), abandon(), busy(),
# held_jobs(), forget() and stop(); it answers through deliver(), fail_head(), measured(),
# requeue() and refuse(), and registers what it waits on with the engine's selector.
#
# The turn: whoever holds _turn_lock owns the engine's state. The engine thread holds it except
# while it sleeps; a caller waiting for results takes it when free and runs the turns itself, so
# an answer reaches it with no thread hand-off (and submit() sends at once). Both sleep in one
# selector that a result, a death, a request or the clock wakes: nothing polls, and work moves
# whether or not anybody is in an mplite call. With fork, the holder forks new workers while
# other threads run: a lock one of *your* threads holds stays held in the worker (see README).
# ---------------------------------------------------------------------------------------------

# A caller waits in slices this long: a Ctrl-C taken by another thread (the kernel gives SIGINT
# to any thread), or any Ctrl-C on Windows before Python 3.14, is raised only once a wait returns.
_WAKE_SECONDS = 0.5
_BATCH_SECONDS = 0.004  # a batch: as many tasks of one function as make this much work, as measured
_MAX_BATCH = 4096
_LINGER_SECONDS = 0.01  # see _Engine._run
_PATIENCE_SECONDS = 0.001  # how long a caller waits for the turn
_AHEAD_SECONDS = 0.008  # a busy worker gets its next message this close to done
_TIMED_KEYS = 4096      # durations kept for at most this many functions
_UNPICKLE_SECONDS = 60  # the most a timed message may take to unpickle


class _Job:
    """Tasks owner.items[start:stop], travelling together in order; in flight, it shrinks from the front."""
    __slots__ = ("owner", "start", "stop", "payload", "alone")

    def __init__(self, owner, start, stop, payload=None, alone=False):
        self.owner = owner
        self.start = start
        self.stop = stop
        self.payload = payload  # a single task, pickled alone
        self.alone = alone  # a chain's next step: it travels alone


class _Message:
    """One message in flight: its jobs, in running order, and how many tasks are still owed."""
    __slots__ = ("jobs", "owed", "key", "timed", "alone", "began", "sent_at", "skip", "number", "where")

    def __init__(self, jobs, key, owed, timed, alone=False):
        self.jobs = deque(jobs)
        self.owed = owed
        self.key = key        # _timing_key of the function all its tasks call
        self.timed = timed    # a task of it has a timeout
        self.alone = alone    # a chain's next step; on an executor, a suspect
        self.began = None     # when its first owed task began; None: not known yet
        self.sent_at = None
        self.skip = 0         # answers to come for tasks timed out already
        self.number = 0       # its place among its worker's messages
        self.where = None     # the worker, or executor's future, holding it

    def pop_head(self):
        """(owner, slot) of the first task owed, no longer owed."""
        job = self.jobs[0]
        slot = job.start
        job.start += 1
        if job.start == job.stop:
            self.jobs.popleft()
        self.owed -= 1
        return job.owner, slot

    def head_task(self):
        job = self.jobs[0]
        return job.owner.task(job.start)


class _Engine:
    """Callers (any thread) use start(), put(), send_now(), wait(), drop() and close(); the rest is the turn's."""

    def __init__(self, backend, size, drain_at_exit=False):
        self.backend = backend
        backend.engine = self
        self.size = size
        self.drain_at_exit = drain_at_exit  # finish the queued work at exit (executor)
        self.inbox = _Inbox()
        self.ready = threading.Event()  # every worker is ready, or the pool broke first
        self.failure = None             # why the pool broke by itself (a BrokenProcessPool)
        self.closed = False             # it takes no more requests
        self.thread = None
        self._lock = threading.Lock()   # guards these two, `closed` and `followers`:
        self._requests = deque()        # jobs and commands, for the turn
        self._closing = None            # (grace, drain, error) once close() was asked for
        self._turn_lock = threading.Lock()  # the turn; its holder writes:
        self.turn_holder = None     # the thread id of a caller holding it
        self.caller_turns = 0       # turns callers held: the engine thread's events may be stale
        self.thread_asleep = False  # the engine thread sleeps, or is about to, without the turn
        self.caller_asleep = False  # a caller holding the turn sleeps
        self.thread_wakes_at = None
        self.soonest = None         # a task's next deadline, as the last turn saw
        self.caller_left_at = -1.0  # when a caller last let go of the turn
        self.followers = 0          # callers waiting on their owner meanwhile
        self.pending_work_items = deque()  # the turn's own: jobs waiting for a worker
        self.durations = {}  # timing key -> seconds per task, as measured
        self.arrivals = 0    # jobs handed over (see _Worker.globals_sent)
        self.timeouts = False  # a task with a timeout came: deadlines matter

    # -- what callers use, from any thread -------------------------------------------------------

    def start(self):
        """Start the backend (see _Processes.start) and the engine thread; don't wait for the workers."""
        self.pid = os.getpid()
        _live_engines.add(self)
        self.wake_up = _WakeUp()
        self.selector, self.wake_only = _Selector(), _Selector()  # wake_only: see _run
        for selector in (self.selector, self.wake_only):
            selector.register(self.wake_up.waitable, selectors.EVENT_READ, None)
        try:
            self.backend.start(self.size)
        except BaseException:
            self.backend.stop(0)
            self._close_files()
            raise
        atexit.register(self._at_exit)
        self.thread = threading.Thread(target=self._run, name="mplite-engine", daemon=True)
        # The engine thread blocks SIGINT: a Ctrl-C taken there would not wake the main thread
        # waiting for results (only a signal to its own thread cuts a lock's wait short).
        with _sigint_blocked():
            self.thread.start()

    def put(self, request, ring=True):
        """A _Job for the turn, or a command (a callable) to run there. ring=False: this caller
        runs the turn itself next (send_now() or wait()), so nobody is woken for it."""
        with self._lock:
            if self.closed:
                raise self.refusal()
            self._requests.append(request)
        if ring and (self.thread_asleep or self.caller_asleep):
            self.wake_up.ring()

    def send_now(self):
        """Send what was put if the turn is free (submit()). Hold no lock of your own: callbacks may run."""
        if self._hold_turn():
            self._in_turn(self._prepare)
        else:  # its holder takes the requests, and may sleep
            self.wake_up.ring()

    def _in_turn(self, work):
        """work() in a turn this caller holds, then let go. An error, or a Ctrl-C not asleep, fails the pool."""
        try:
            work()
        except KeyboardInterrupt:
            if not self.caller_asleep:  # amid the engine's work: its state may be torn
                self._fail(KeyboardInterrupt("interrupted while this thread ran mplite's engine"))
            raise
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.caller_asleep = False
            self._release_turn()

    def wait(self, done, sleep, timeout=None):
        """The one way callers wait: until done() or for timeout seconds (None: no limit); return
        done(). While nobody holds the turn, the caller takes it and runs the engine itself
        (leader/follower); else it sleep(seconds)s on its owner. In slices: see _WAKE_SECONDS."""
        if done():
            if self._requests:  # put by this caller with ring=False
                self.send_now()
            return True
        self.refuse_inside_turn()
        deadline = None if timeout is None else _now() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - _now())
            span = _WAKE_SECONDS if left is None else min(left, _WAKE_SECONDS)
            if not self._lead(done, span) and span:
                if self._requests:  # see send_now()
                    self.wake_up.ring()
                self._follow(1)
                try:
                    sleep(span)
                finally:
                    self._follow(-1)
            if done():
                return True
            if left is not None and _now() >= deadline:
                return False
            if not self.thread.is_alive() and not done():  # shut down, and this owner wasn't told
                raise self.refusal()

    def _follow(self, n):
        with self._lock:
            self.followers += n

    def refuse_inside_turn(self):
        if self.turn_holder == threading.get_ident() or threading.current_thread() is self.thread:
            raise RuntimeError("a TaskChain's next_task (or a Future's callback) runs on the thread that runs "
                               "mplite's engine, which can't wait for results there: it is what delivers them")

    def drop(self, calls):
        """Drop calls nobody waits for any more (an imap() left early)."""
        with contextlib.suppress(RuntimeError):  # the pool has stopped
            self.put(functools.partial(self._forget, *calls))

    def refusal(self):
        if self.failure is not None:
            return BrokenProcessPool(f"the pool is broken: {self.failure}")
        return RuntimeError("the pool has been stopped: no more tasks can be submitted")

    def raise_if_broken(self):
        if self.failure is not None:  # a fresh one: the caller's traceback
            raise type(self.failure)(*self.failure.args)

    def close(self, grace=0.2, drain=False, wait=True):
        """Stop the pool at once, or once the work handed over is done (drain, which at once overrides);
        the workers get `grace` seconds to exit. wait: return once done."""
        if os.getpid() != self.pid or self.thread is None:  # a fork doesn't own the pool
            return
        with self._lock:
            if self._closing is None or (self._closing[1] and not drain):
                self._closing = (grace, drain, None)
        self.wake_up.ring()
        if wait and threading.current_thread() is not self.thread and self.turn_holder != threading.get_ident():
            while self.thread.is_alive():
                self.thread.join(_WAKE_SECONDS)  # in slices: Ctrl-C on Windows

    def _at_exit(self):
        # An executor finishes its work, as the standard library's does; not after a Ctrl-C, nor a TaskManager.
        interrupted = getattr(sys, "last_type", None) is KeyboardInterrupt
        self.close(drain=self.drain_at_exit and not interrupted)

    # -- the turn --------------------------------------------------------------------------------

    def _hold_turn(self):
        """True if taken: the engine thread holds it for moments (never asleep); another caller may hold it."""
        me = threading.get_ident()
        if _PORTABLE or self._closing is not None or self.turn_holder == me or \
                self.thread.ident == me or not self._turn_lock.acquire(timeout=_PATIENCE_SECONDS):
            return False  # portable: only the engine thread runs it (see there)
        self.turn_holder = me
        self.caller_turns += 1
        return True

    def _release_turn(self):
        """Let go, and wake the engine thread for work that came, or a deadline sooner than it planned."""
        try:
            self.turn_holder = None
            soonest, wakes_at = self.soonest, self.thread_wakes_at
            ring = self.thread_asleep and (self._requests or self._closing is not None or self.followers or (
                soonest is not None and (wakes_at is None or soonest < wakes_at)))
        finally:  # a Ctrl-C here must not keep the turn
            self._turn_lock.release()
        if ring:
            self.wake_up.ring()

    def _lead(self, done, span):
        """Run turns in this thread for up to `span` seconds, until done(); False if another holds the turn."""
        if not self._hold_turn():
            return False
        until = _now() + span

        def turns():
            while True:  # at least once: a wait of 0 s reads what came
                timeout = self._prepare()  # its commands may deliver
                if timeout is False or done():
                    break  # closing: the engine thread does that
                left = max(0.0, until - _now())
                self.caller_asleep = True  # a Ctrl-C from here to the select finds nothing half done
                if self._requests:
                    left = 0
                events = self.selector.select(left if timeout is None else min(left, timeout))
                self.caller_asleep = False
                self._handle(events)
                if done() or _now() >= until:
                    break
            self.caller_left_at = _now()

        self._in_turn(turns)
        return True

    def _run(self):
        """The engine thread: the turn whenever no caller holds it. For _LINGER_SECONDS after a
        waiting caller let go, it watches only the wake-up: that caller is likely back soon, and
        two threads woken by every answer would fight for the GIL (requests and deadlines still wake it)."""
        events, seen = (), -1
        try:
            while True:
                self._take_turn_back()
                try:
                    if self.caller_turns == seen:  # else a caller ran meanwhile: events are stale
                        self._handle(events)
                    events = ()  # nothing of them kept while it sleeps (a dead worker, say)
                    closing = self._closing
                    timeout = self._prepare()
                    if timeout is False:
                        break
                    seen, selector = self.caller_turns, self.selector
                    linger = self.caller_left_at + _LINGER_SECONDS - _now()
                    if linger > 0 and not self.followers:
                        selector = self.wake_only
                        timeout = linger if timeout is None else min(linger, timeout)
                    self.thread_wakes_at = None if timeout is None else _now() + timeout
                    self.thread_asleep = True
                    if self._requests or self._closing is not closing or (
                            closing is not None and self._idle()):  # came in since, or done: no sleep
                        timeout = 0
                finally:
                    self._turn_lock.release()
                events = selector.select(timeout)  # without the turn: a caller may take it
                self.thread_asleep = False
        except BaseException as exc:  # broken, or a bug of ours: fail every caller
            self._fail(exc)
        self._take_turn_back()
        self._shut_down()
        self._turn_lock.release()

    def _take_turn_back(self):
        """A Ctrl-C may stop a caller after it took the lock, before it said so: seen so twice, the lock is ours."""
        orphaned = 0
        while not self._turn_lock.acquire(timeout=0.25):
            orphaned = orphaned + 1 if self.turn_holder is None else 0
            if orphaned == 2:
                return

    def _prepare(self):
        """Take the requests, send work, enforce timeouts: seconds to the next deadline, or False: close."""
        requests = self._requests
        while requests:
            request = requests.popleft()
            if request.__class__ is _Job:
                self.arrivals += 1
                self.pending_work_items.append(request)
                if request.owner.timeout is not None:
                    self.timeouts = True
            else:
                request()  # a command
        closing = self._closing
        if closing is not None and (not closing[1] or self._idle()):
            return False
        self.backend.dispatch()
        return self._enforce_timeouts(_now())

    def _handle(self, events):
        for key, _ in events:
            if key.data is None:
                self.wake_up.clear()
            else:
                key.data()  # the backend's: a worker's answers, or its death

    def _fail(self, exc):
        """The turn failed: the engine thread shuts the pool down."""
        error = exc if isinstance(exc, BrokenProcessPool) else BrokenProcessPool(
            f"mplite's engine failed:\n{_describe(exc)[0]}")
        with self._lock:
            self._closing = (0, False, error)
        self.wake_up.ring()

    def _idle(self):
        return not (self.pending_work_items or self._requests or self.backend.busy())

    def _shut_down(self):
        """Tell every waiting caller the pool is gone, then stop the workers."""
        grace, _, error = self._closing or (0, False, None)
        with self._lock:
            self.closed = True
            self.failure = error
            requests, self._requests = self._requests, deque()
        atexit.unregister(self._at_exit)
        if error is None:
            error = RuntimeError("the pool was stopped before this work was done")
        jobs = [r for r in requests if r.__class__ is _Job] + list(self.pending_work_items)
        jobs += self.backend.held_jobs()
        for owner in {id(j.owner): j.owner for j in jobs}.values():
            owner.stopped(error)
        self.inbox.close(error)
        self.pending_work_items.clear()
        self.ready.set()
        self.backend.stop(grace)
        self._close_files()

    def _close_files(self):
        for closable in (self.selector, self.wake_only, self.wake_up):
            closable.close()

    # -- what runs in the turn, for the backend --------------------------------------------------

    def take_batch(self, seconds, most, free, timed_alone=False):
        """The next message (None: nothing waits): queued tasks of one function, as many as make
        `seconds` of work as measured (at most `most`; one while not measured), fewer near the
        queue's end, so the last tasks spread over the workers (not where a stream's input goes
        on: its queue is always short). free: the workers free now, this one included, each due
        an equal share of the queue (a few tiny tasks go one to each, not all to one; streams
        too). timed_alone: timed tasks go alone."""
        pending, jobs, count, timed = self.pending_work_items, [], 0, False
        while pending:
            job = pending[0]
            owner = job.owner
            if owner.cancelled or (not jobs and not owner.claim()):  # a cancelled future, say
                pending.popleft()
                continue
            key = owner.key_of(job.start)
            alone = job.alone or (timed_alone and owner.timeout is not None)
            if not jobs:
                first, per = key, self.durations.get(key)
                n = 1 if per is None or alone else max(1, min(most, int(seconds / max(per, 1e-7))))
                if n > 1:  # near the queue's end, half a worker's share but no less than an
                    # eighth of a full message (it costs more than it saves); and never more than an
                    # equal share among the workers free now: none stays idle while tasks wait
                    queued = self._queued(2 * self.size * n)
                    if not pending[-1].owner.streaming:
                        n = min(n, max(n // 8, ceil(queued / (2 * self.size))))
                    n = min(n, ceil(queued / free))
            elif key != first or alone or not owner.claim():
                break
            take = min(n - count, job.stop - job.start)
            if owner.key is None:  # tasks of several functions: only the run of this one
                run = 1
                while run < take and owner.key_of(job.start + run) == key:
                    run += 1
                take = run
            if take == job.stop - job.start:
                jobs.append(pending.popleft())
            else:  # split it: the front travels now, the rest stays queued
                jobs.append(_Job(owner, job.start, job.start + take))
                job.start += take
            count += take
            timed = timed or owner.timeout is not None
            if count >= n or take < job.stop - job.start:
                break
        return _Message(jobs, first, count, timed, jobs[0].alone) if jobs else None

    def _queued(self, enough):
        count = 0
        for job in self.pending_work_items:
            count += job.stop - job.start
            if count >= enough:
                break
        return count

    def measured(self, key, seconds):
        """A message of the function `key` took this many seconds per task."""
        old = self.durations.get(key)
        if old is None and len(self.durations) >= _TIMED_KEYS:
            self.durations.clear()
        self.durations[key] = seconds if old is None else old + 0.3 * (seconds - old)

    def requeue(self, jobs):
        """Jobs that never began go back to the front of the queue, in order."""
        self.pending_work_items.extendleft(reversed([j for j in jobs if j.start < j.stop]))

    def deliver(self, msg, values):
        """Results of the tasks at the front of msg, in the order they ran: the hot path."""
        if msg.skip:  # the first answers are of tasks timed out already
            k = min(msg.skip, len(values))
            msg.skip -= k
            values = values[k:]
        jobs, i, n = msg.jobs, 0, len(values)
        while i < n:
            job = jobs[0]
            owner, start = job.owner, job.start
            k = min(n - i, job.stop - start)
            job.start = start + k
            if job.start == job.stop:
                jobs.popleft()
            if owner.plain:
                owner.deliver_results(start, values if k == n else values[i:i + k])
            else:
                for j in range(k):
                    self.finish(owner, start + j, True, values[i + j])
            i += k
        msg.owed -= n

    def fail_head(self, msg, failure):
        if msg.skip:
            msg.skip -= 1
        else:
            self.finish(*msg.pop_head(), False, failure)

    def finish(self, owner, slot, ok, value):
        """A task is done: its chain goes on, or its owner gets the outcome."""
        if owner.cancelled:
            return
        item = owner.items[slot]
        if ok and isinstance(item, TaskChain):
            try:
                step = _next_step(item, value)
            except _TASK_ERRORS as exc:
                ok, value = False, _Failure(*_describe(exc))
            else:
                if step is not None:  # the chain goes on, ahead of the queue, on its own
                    owner.items[slot] = step
                    self.pending_work_items.appendleft(_Job(owner, slot, slot + 1, alone=True))
                    return
        owner.deliver(slot, ok, value)
        if owner.cancelled:  # an execute() failed: the rest of it is not wanted
            self._forget(owner)

    def refuse(self, owner, start, stop, error):
        """Tasks that can't be sent: each fails with the error (an execute() or map() fails)."""
        failure = _Failure.of(error, refused=True)
        for slot in range(start, stop):
            self.finish(owner, slot, False, failure)

    def _enforce_timeouts(self, now):
        """Fail each task past its timeout (a generous one while its message unpickles): seconds to the next."""
        soonest = None
        for msg in self.backend.running() if self.timeouts else ():
            owner = msg.jobs[0].owner
            if owner.timeout is None:
                continue
            deadline = (msg.sent_at + _UNPICKLE_SECONDS if msg.began is None else msg.began) + owner.timeout
            if now < deadline:
                soonest = deadline if soonest is None else min(soonest, deadline)
                continue
            task = msg.head_task()
            owner, slot = msg.pop_head()
            msg.skip += 1
            self.backend.abandon(msg)
            self.finish(owner, slot, False, _Failure.of(TimeoutError(
                f"{_short(task)} did not finish within {owner.timeout} s; {self.backend.timeout_note}")))
        self.soonest = soonest
        return None if soonest is None else max(0.0, soonest - now)

    def _forget(self, *calls):
        """Calls (execute(), map(), a stream's chunks: the owners that can be cancelled) that want no
        more: their queued jobs go, results of the others are ignored."""
        for call in calls:
            call.cancelled = True
            self.backend.forget(call)
        self._keep_pending(lambda job: not job.owner.cancelled)

    def _keep_pending(self, keep):
        """Filter the queue in place: the backends' loops hold it."""
        kept = [job for job in self.pending_work_items if keep(job)]
        self.pending_work_items.clear()
        self.pending_work_items.extend(kept)

    def cancel_pending(self):
        """shutdown(cancel_futures=True): free workers get theirs first (running once assigned)."""
        self.backend.dispatch()
        self._keep_pending(lambda job: not job.owner.cancel(job.start, job.stop))


_live_engines = weakref.WeakSet()


def _timing_key(f):
    """What a task's duration is measured by, one for every call of a function: its code (shared
    by lambdas made in a loop, and bound methods); a partial's function's; a class or built-in by
    its name; any other callable by its type (not a new, unmeasured function for each task)."""
    code = getattr(f, "__code__", None)
    if code is not None:
        return code
    if isinstance(f, functools.partial):
        return _timing_key(f.func)
    if isinstance(f, (type, types.BuiltinFunctionType)):
        return getattr(f, "__module__", None), f.__qualname__
    return type(f)


@contextlib.contextmanager
def _sigint_blocked():
    """Inherited: a worker started meanwhile is deaf to Ctrl-C until it ignores it (so it prints nothing)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _PipeWakeUp:
    """What rings a sleeping turn: a pipe the engine always waits on. It rings once until the
    turn clears it, so the pipe never fills, and the turn takes the requests after clearing."""

    def __init__(self):
        self.waitable, self.w = os.pipe()
        os.set_blocking(self.waitable, False)
        self.rung = False
        self.lock = threading.Lock()  # ring() and close(): a closed descriptor may be reused

    def ring(self):
        if not self.rung:
            with self.lock:
                if self.w is not None:  # else closed: the engine has stopped
                    self.rung = True
                    with contextlib.suppress(OSError):
                        os.write(self.w, b"\0")

    def clear(self):
        with contextlib.suppress(OSError):  # nothing more to read
            while os.read(self.waitable, 512):
                pass
        self.rung = False

    def close(self):
        with self.lock:
            w, self.w = self.w, None
        os.close(self.waitable)
        os.close(w)


# ---------------------------------------------------------------------------------------------
# mplite's own workers: the backend and the worker's loop
#
# Every worker has a Pipe and a journal in shared memory. It writes each answer to its journal,
# and sends the journal in one write when the message is done (or every few milliseconds): a
# system call costs more than a tiny task. If it dies, the turn reads the answers it missed
# from the journal: it costs only the task it was running, and no task runs twice.
# ---------------------------------------------------------------------------------------------

_READ_SIZE = 1 << 18
_BIG_FRAME = 1 << 20  # larger frames are read straight into their own buffer
# A message sent ahead to a busy worker fits the socket's buffer: the turn never blocks on a
# worker that is itself blocked sending a large result.
_AHEAD_BYTES = 1 << 16
_BOOT_DEATHS = 50  # workers killed while booting, in a row, before we give up
_GUARD_CURE = (" If the script starts the pool at its top level, start it under `if __name__ == "
               "\"__main__\":` instead: each worker process imports the main script again.")


class _Worker:
    """One worker process, its pipe, and the messages it holds (the first is running)."""

    def __init__(self, process, conn, journal, max_tasks, child_end):
        self.process = process
        self.sentinel = _exit_fd(process)
        self.conn = conn
        self.link = _Link(conn)
        self.ahead_bytes = min(_AHEAD_BYTES, self.link.room() // 2)
        self.journal = journal   # answers it wrote and may not have sent
        self.messages = deque()  # _Messages sent and not yet answered, in order
        self.sent = 0            # messages sent to it
        self.received = 0        # answers read from its pipe
        self.ready = False       # worker_init is done
        self.open = True
        self.killed = False      # its running task was past its timeout
        self.gone = False
        self.left = max_tasks    # tasks it may still be sent (max_tasks_per_child)
        self.globals_sent = {}   # globals of functions sent by value: see _pickle
        self.globals_since = 0   # the engine's arrivals when that began
        self.child_end = child_end  # the portable path holds it until ready
        self.done_key = None     # the timing key of its last message done

    def send(self, body):
        self.link.write([_LENGTH.pack(len(body)), body])

    def close(self):
        """Let go of its pipe, sentinel, process and journal now, not when the collector finds them."""
        self.conn.close()
        if self.child_end is not None:
            self.child_end.close()
        if self.sentinel != self.process.sentinel:
            os.close(self.sentinel)
        with contextlib.suppress(ValueError):  # "still running": another thread's active_children()
            self.process.close()               # reaped it first, and multiprocessing can't tell
        self.journal = None


class _Processes:
    """The backend of mplite's own worker processes (see above). Turn only, but start()."""
    timeout_note = "its worker process was stopped"

    def __init__(self, ctx, init, max_tasks, init_label):
        self.ctx = ctx
        self.init = init
        self.init_label = init_label  # "worker_init" or "initializer"
        self.max_tasks = max_tasks
        self.fork = ctx.get_start_method() == "fork"
        self.forked_main = None  # fork: the classes of __main__ workers inherit (see _pickle)
        self.workers = []
        self.missing = 0         # workers to start
        self.boot_deaths = 0
        self.large_head = None   # the queued job too large to send ahead

    def payload(self, task):
        """A submit()ted task, pickled now: it fails here, naming the task, if it can't."""
        return _pickle_task(task, self.forked_main)

    def start(self, size):
        """In the caller's thread: spawned workers import __main__.__file__, gone after the script."""
        if _MAX_WORKERS is not None and size > _MAX_WORKERS:
            raise ValueError(f"at most {_MAX_WORKERS} workers on this system, not {size}")
        _main_file()  # remember it while the script runs
        if self.fork:
            main = vars(sys.modules["__main__"])
            self.forked_main = weakref.WeakValueDictionary({k: v for k, v in main.items() if isinstance(v, type)})
        self.init_blob = None  # what the workers get of init: see _worker_main
        if self.init is not None:
            try:  # pickled like a task, to run in the tasks' namespace
                self.init_blob = _pickle_task(self.init, self.forked_main)
            except UnpicklableTaskError:  # before starting anything
                if not self.fork:
                    raise
                self.init_blob = (self.init.f, self.init.args, self.init.kwargs)  # inherited
        self.lifeline, self.lifeline_end = self.ctx.Pipe(duplex=False)
        self.missing = size
        self._start_missing()

    def _start_missing(self):  # the portable path's wait() takes at most _HANDLES
        while self.missing and (_HANDLES is None or 3 + sum(2 - w.ready for w in self.workers) <= _HANDLES):
            self.missing -= 1
            self._spawn()

    def _spawn(self):
        conn, child_conn = self.ctx.Pipe()
        journal = Arena(_JOURNAL_SIZE)  # RawArray's, without its 10 ms ctypes import
        process = self.ctx.Process(target=_worker_main, name="mplite-worker", args=(
            child_conn, journal, self.lifeline, self.lifeline_end, self.init_blob))
        if not self.fork and os.name == "posix":
            # They unblock SIGINT when started (the tracker), or keep it blocked for all their
            # children (the forkserver): start them outside the window below.
            resource_tracker.ensure_running()
            if self.ctx.get_start_method() == "forkserver":
                forkserver.ensure_running()
        try:
            with _sigint_blocked(), _main_path_for_workers(self.fork):
                process.start()
        except BaseException:
            conn.close()
            child_conn.close()
            raise
        w = _Worker(process, conn, journal, self.max_tasks, child_conn if _PORTABLE else None)
        if not _PORTABLE:
            child_conn.close()
        self.workers.append(w)
        selector = self.engine.selector
        selector.register(w.sentinel, selectors.EVENT_READ, functools.partial(self._reap, w))
        selector.register(w.link.waitable, selectors.EVENT_READ, functools.partial(self._read, w))

    # -- sending ---------------------------------------------------------------------------------

    def dispatch(self):
        """Work to idle workers (starting ones too), then a message ahead to busy ones about to be done."""
        self._start_missing()
        pending = self.engine.pending_work_items
        idle = [w for w in self.workers if w.open and not w.messages]
        for i, w in enumerate(idle):
            if not pending:
                return
            self._send(w, False, len(idle) - i)
        if not pending or pending[0] is self.large_head:
            return
        self.large_head = None
        now = _now()
        for w in self.workers:
            if not pending:
                return
            if w.open and w.ready and len(w.messages) == 1 and self._ends_soon(w.messages[0], now):
                self._send(w, True, 1)

    def _ends_soon(self, msg, now):
        """Will msg be done within _AHEAD_SECONDS, as measured, and is it on time? A task sent
        ahead can't be taken back: nothing goes behind a long task, or a stuck one."""
        per = self.engine.durations.get(msg.key)
        if per is None or msg.began is None:
            return False
        expected = per * msg.owed
        return expected <= _AHEAD_SECONDS and now - msg.began <= 2 * expected + _BATCH_SECONDS

    def _send(self, w, ahead, free):
        engine = self.engine
        if w.globals_since != engine.arrivals:  # new work came: globals afresh (see _pickle)
            w.globals_sent, w.globals_since = {}, engine.arrivals
        sent = w.globals_sent.copy() if ahead else w.globals_sent  # it may be too large to go
        most = _MAX_BATCH if w.left is None else min(_MAX_BATCH, w.left)
        body = None
        while body is None:  # none of those could be pickled
            msg = engine.take_batch(_BATCH_SECONDS, most, free)
            if msg is None:
                return
            body = self._pickle_message(msg, sent)
        if ahead and len(body) > w.ahead_bytes:
            engine.requeue(msg.jobs)
            self.large_head = engine.pending_work_items[0]
            return
        w.sent += 1
        msg.number, msg.where, msg.sent_at = w.sent, w, _now()
        if not w.messages and not msg.timed:
            msg.began = msg.sent_at
        w.messages.append(msg)  # first: a Ctrl-C in a long send leaves it where the shutdown finds it
        try:
            w.send(body)
        except OSError:  # the worker is gone: its sentinel will tell
            w.messages.pop()
            w.sent -= 1
            w.open = False
            return engine.requeue(msg.jobs)
        w.globals_sent = sent
        if w.left is not None:
            w.left -= msg.owed
            if w.left == 0:  # it exits after these, and is replaced
                w.open = False
                with contextlib.suppress(OSError):
                    w.send(b"")

    def _pickle_message(self, msg, sent):
        """The message's body, or None if none of its tasks can be pickled (they have failed).
        sent: the globals of functions sent by value the worker holds (see _pickle)."""
        if all(j.payload is not None for j in msg.jobs):  # submitted tasks
            return pickle.dumps((msg.timed, [(None, False, [j.payload for j in msg.jobs])]), -1)
        runs = [(None, False, [j.payload]) if j.payload is not None else j.owner.run(j.start, j.stop)
                for j in msg.jobs]
        try:
            return _pickle((msg.timed, runs), self.forked_main, sent)
        except _TASK_ERRORS:
            pass
        # Some task can't travel: pickle them one by one, fail that one, send the others.
        singles = [single for job in msg.jobs for single in self._singles(job)]
        msg.jobs = deque(singles)
        msg.owed = len(singles)
        return _pickle((msg.timed, [(None, False, [j.payload]) for j in singles])) if singles else None

    def _singles(self, job):
        """A job of one task, pickled alone, for each task of `job` that can be; the others fail."""
        for slot in range(job.start, job.stop):
            try:
                payload = job.payload or _pickle_task(job.owner.task(slot), self.forked_main)
            except UnpicklableTaskError as exc:
                self.engine.refuse(job.owner, slot, slot + 1, exc)
            else:
                yield _Job(job.owner, slot, slot + 1, payload)

    # -- answers ---------------------------------------------------------------------------------

    def _read(self, w):
        if w.gone:
            return
        try:
            frames = w.link.read()
        except (EOFError, OSError):
            self.engine.selector.unregister(w.link.waitable)
            if _PORTABLE and w.ready:  # it has ended (see the portable path)
                self._reap(w)
            return
        now = _now()
        for frame in frames:
            self._take(w, frame, now)

    def _take(self, w, frame, now):
        """The answers in a worker's frame: the hot path, a few C calls per frame."""
        count, form, spent = _HEADER.unpack_from(frame)
        if form == _STARTED:
            if w.messages and w.messages[0].number == count:
                w.messages[0].began = now
            return
        w.received += count
        if not count:  # the time of a message whose answers went before
            if w.done_key is not None and spent >= 0:
                self.engine.measured(w.done_key, spent)
            return
        if form == _LISTED:
            self.engine.deliver(w.messages[0], marshal.loads(memoryview(frame)[_HEADER.size:]))
        elif form == _WORDS:
            self.engine.deliver(w.messages[0], struct.unpack_from(f"={count}q", frame, _HEADER.size))
        else:
            words, blobs = _entries(frame, _HEADER.size, count, _HEADER.size + 8 * count)
            values = None
            if form == _PICKLED:
                try:
                    values = list(map(pickle.loads, blobs))  # no Python loop
                except _TASK_ERRORS:  # one of them can't be unpickled: one by one, below
                    pass
            if values is not None:
                self.engine.deliver(w.messages[0], values)
            elif not any([self._take_one(w, word & 7, blob) for word, blob in zip(words, blobs)]):
                return  # no task's answer among them
        self._progress(w, spent, now)

    def _take_one(self, w, kind, blob):
        """An entry of a frame or of a dead worker's journal: its bytes (an _INT's: the int)."""
        if kind in _ANSWER_KINDS:
            msg = w.messages[0]
            try:
                value = blob if kind == _INT else marshal.loads(blob) if kind == _SCALAR else pickle.loads(blob)
            except _TASK_ERRORS as exc:  # an error of that task
                error = TypeError(f"the result of {_short(msg.head_task())} can't be unpickled here: {exc}")
                value, kind = _describe(error), _FAILED
            if kind == _FAILED:
                self.engine.fail_head(msg, _Failure(*value))
            else:
                self.engine.deliver(msg, [value])
            return True
        if kind == _READY:
            w.ready = True
            self.boot_deaths = 0
            for msg in w.messages:  # a timeout's grace counts from now
                msg.sent_at = _now()
            if w.child_end is not None:  # its pipe tells of its death now
                w.child_end.close()
                self.engine.selector.unregister(w.sentinel)
            if not self.missing and all(w.ready for w in self.workers):
                self.engine.ready.set()  # start() returns
        elif kind == _INIT_FAILED:
            raise BrokenProcessPool(f"{self.init_label} {_short(self.init)} failed in a worker process:\n"
                                    f"{pickle.loads(blob)}")
        else:  # _UNREADABLE: a task of its head message can't be unpickled: one by one
            msg = w.messages.popleft()
            w.globals_sent = {}  # it may have missed that message's globals
            self.engine.requeue([single for job in msg.jobs for single in self._singles(job)])
            if w.messages:
                w.messages[0].began = None if w.messages[0].timed else _now()
        return False

    def _progress(self, w, spent, now):
        """After answers: measure the message once it is done; the next task began now."""
        messages = w.messages
        if not messages:
            return
        msg = messages[0]
        if spent >= 0:
            self.engine.measured(msg.key, spent)
        if msg.owed or msg.skip:
            msg.began = now
            return
        w.done_key = messages.popleft().key
        if messages:
            messages[0].began = None if messages[0].timed else now

    # -- faults, and the end ---------------------------------------------------------------------

    def _reap(self, w):
        """A worker process has ended: collect what it sent, charge its running task, replace it."""
        if w.gone:
            return
        engine = self.engine
        with contextlib.suppress(EOFError, OSError):  # what its pipe still holds
            while wait([w.link.waitable], 0):
                for frame in w.link.read():
                    self._take(w, frame, _now())
        w.process.join()
        for kind, blob in _unsent_answers(w.journal, w.received):
            self._take_one(w, kind, blob)
            self._progress(w, -1.0, _now())
        w.gone = True
        msg = w.messages[0] if w.messages else None
        # Its running task dies with it if it read that message (the journal counts them).
        died = msg and msg.owed and w.ready and not w.killed and \
            _JOURNAL_HEAD.unpack_from(w.journal.buffer)[1] >= msg.number
        code, pid = w.process.exitcode, w.process.pid
        for waitable in (w.sentinel, w.link.waitable):
            with contextlib.suppress(KeyError, ValueError):
                engine.selector.unregister(waitable)
        w.close()
        self.workers.remove(w)
        self.missing += 1
        if died:
            text = f"the worker process (pid {pid}) running {_short(msg.head_task())} {_exit_reason(code)}"
            # Its text reads as in mplite 1.x; exception mode raises the richer class.
            engine.fail_head(msg, _Failure(_describe(ChildProcessError(text))[0], exc=WorkerDiedError(text)))
        # The rest never began (after a timeout, the next may have, just: it runs again).
        for msg in w.messages:
            engine.requeue(msg.jobs)
        w.messages.clear()  # a message refers to its worker: let both go now
        if not w.ready:
            # Killed from outside: start another, within reason. Exited by itself: it would again.
            self.boot_deaths += 1
            # An exit code is the process's own, but on Windows os.kill(pid, n) ends it with n.
            by_itself = code is not None and (code == 1 or (code >= 0 and os.name == "posix"))
            if by_itself or self.boot_deaths > _BOOT_DEATHS:
                cure = "" if self.fork else _GUARD_CURE
                raise BrokenProcessPool(f"a worker process {_exit_reason(code)} before it was ready; "
                                        f"see its output above.{cure}")

    def running(self):
        """For timeouts: messages whose first owed task may be running (not booting nor stopped)."""
        return [w.messages[0] for w in self.workers if w.ready and w.messages and w.messages[0].owed
                and not w.killed]

    def abandon(self, msg):
        """msg's running task is past its timeout: stop its worker (and replace it)."""
        w = msg.where
        w.killed = True
        w.open = False
        w.process.kill()

    def busy(self):
        return any(w.messages for w in self.workers)

    def held_jobs(self):
        return [job for w in self.workers for msg in w.messages for job in msg.jobs]

    def forget(self, owner):
        pass

    def stop(self, grace):
        """Ask the workers to exit; after `grace` seconds, terminate the rest. Reap them all."""
        for w in self.workers:
            if not w.ready:  # still starting: it holds no work, so don't wait for it
                w.process.terminate()
                continue
            with contextlib.suppress(OSError):
                w.send(b"")
        processes = [w.process for w in self.workers]
        alive = _wait_for_exit(processes, grace)
        for p in alive:
            p.terminate()
        for p in _wait_for_exit(alive, 1.0):
            p.kill()
        for p in processes:
            p.join()
        for w in self.workers:
            w.close()
            w.messages.clear()  # a message refers to its worker: let both go now
        self.workers.clear()
        if hasattr(self, "lifeline"):
            self.lifeline.close()
            self.lifeline_end.close()


def _exit_fd(process):
    """What becomes readable when the process ends: a pidfd where there are; the sentinel pipe
    stays open in any child a task forks, and would hide the worker's death until it ends."""
    if not _PORTABLE:
        with contextlib.suppress(AttributeError, OSError):
            return os.pidfd_open(process.pid)
    return process.sentinel


@contextlib.contextmanager
def _main_path_for_workers(fork):
    """Spawned workers run __main__.__file__ again: only if it is a file (not `python -`'s
    '<stdin>'; its functions travel by value anyway), and even once Python has deleted it at the
    end of the script, while an executor still starts workers. None: multiprocessing runs none."""
    main = vars(sys.modules["__main__"])
    had, want = main.get("__file__"), _main_file()
    if fork or had == want:
        yield
        return
    main["__file__"] = want
    try:
        yield
    finally:
        if had is None:
            main.pop("__file__", None)
        else:
            main["__file__"] = had


def _close_inherited_ends():
    """In a fork of the parent (its own, or a worker), let go of the copies of ends whose every
    copy must close for a death to show: the parent's end of each lifeline (the workers see the
    parent's death), and on the portable path, the child ends kept until a worker is ready."""
    for engine in list(_live_engines):
        for end in [getattr(engine.backend, "lifeline_end", None)] + [
                w.child_end for w in getattr(engine.backend, "workers", ())]:
            if end is not None and not end.closed:
                end.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_ends)


def _wait_for_exit(processes, seconds):
    """Wait up to `seconds` for the processes to end; return those still alive."""
    deadline = _now() + seconds
    alive = [p for p in processes if p.exitcode is None]
    while alive and _now() < deadline:
        wait([p.sentinel for p in alive], max(0.0, deadline - _now()))
        alive = [p for p in alive if p.exitcode is None]
    return alive


# -- the worker process ---------------------------------------------------------------------------

def _worker_main(conn, journal, lifeline, lifeline_end, init):
    """Each worker's loop: read a message of tasks, run them, answer each. init: None, or
    worker_init's (f, args, kwargs), pickled by mplite unless forked (see _pickle)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # see _spawn
    lifeline_end.close()  # a forked worker's copy would hide the parent's death
    threading.Thread(target=_exit_when_closed, args=(lifeline,), daemon=True).start()
    link = _Link(conn)
    out = _Outbox(link, journal)
    try:
        if init is not None:
            try:
                f, args, kwargs = pickle.loads(init) if init.__class__ is bytes else init
                f(*args, **kwargs)  # called here: its traceback starts at init
            except BaseException as exc:
                return out.send_alone(_INIT_FAILED, pickle.dumps(_describe(exc)[0], -1))
        out.send_alone(_READY, b"")
        for message in itertools.chain.from_iterable(iter(link.read, None)):  # to EOFError
            if not message:  # asked to exit
                return
            out.note_received()
            try:
                timed, runs = pickle.loads(message)
            except BaseException:
                out.send_alone(_UNREADABLE, b"")
                continue
            del message
            if timed:  # a timeout counts from here: unpickling may import modules for a while
                link.write([_frame_head(_STARTED, out.messages, 0)])
            out.run(runs, sum(len(run[2]) for run in runs), timed)
            del runs  # let go of the tasks' arguments now, not when the next message comes
    except (EOFError, OSError):  # the parent is gone
        pass


# A message holds runs of tasks, each (f, star, items): f(*item) or f(item) for each item, or
# where f is None, items of (f, args, kwargs) or of bytes (a task pickled alone). A map() travels
# as its arguments only, and a call of one function as its tasks' arguments.

def _callable(run):
    """A run as (f, star, items) to call f(*item) or f(item) with."""
    f, star, items = run
    if f is None:
        return _call_entry, False, items
    if f.__class__ is bytes:  # sent by value to an executor's worker: see _remote_run
        return pickle.loads(f), star, items
    return run


def _call_entry(entry):
    f, args, kwargs = pickle.loads(entry) if entry.__class__ is bytes else entry
    return f(*args, **kwargs)


def _run_task(run, i):
    """The i-th task of a run, to name it."""
    f, star, items = run
    if f is None:
        return Task._of(*(pickle.loads(items[i]) if items[i].__class__ is bytes else items[i]))
    return Task(f, *items[i]) if star else Task(f, items[i])


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc):
        self.exc = exc


class _Outbox:
    """A worker's answers, kept in its journal until a flush sends them in one write (a frame
    has the journal's layout: see the wire) and empties it."""

    def __init__(self, link, journal):
        mem = memoryview(journal.buffer)
        self.link = link
        self.number = 0    # of the journal's first answer: answers sent so far
        self.messages = 0  # read from the parent
        self.head = mem[:_JOURNAL_HEAD.size]
        self.words = mem[_JOURNAL_HEAD.size:_JOURNAL_DATA]
        self.words[:] = _UNWRITTEN_WORDS
        self.ints = False  # its words are int answers (see the wire)
        self.data = mem[_JOURNAL_DATA:]

    def run(self, runs, n, each):
        """Run a message's n tasks, journal each answer, send them all (and some on the way)."""
        words, data = self.words.cast("q"), self.data
        dumps, scalar, scalars, put_float = pickle.dumps, marshal.dumps, _SCALARS, _MARSHAL_F64.pack_into
        # Local names: they are read millions of times a second.
        low, high = _UNWRITTEN, 1 << 63
        # The journal's room, and the clock, are looked at every _LOOK tasks: a float takes 9
        # bytes, so after a look that left room for _LOOK of those, it goes in unchecked (an
        # answer of another kind checks the room for itself).
        room, step = len(data) - 9 * _LOOK, 1 if each else _LOOK
        count = end = 0
        look_at = step
        in_words = True  # the answers so far are ints held in their words
        self._mark(ints=True)
        started = flushed = _now()
        for run in runs:
            first = self.number + count  # the answers before this run's
            f, star, items = _callable(run)
            for item in items:
                try:
                    value = f(*item) if star else f(item)
                except BaseException as exc:  # SystemExit too: it ends the task, not the worker
                    value = _Raised(exc)
                cls = type(value)  # not __class__: a mock's or a proxy's may lie
                if cls is int and in_words and low < value < high:  # most of tiny tasks' results
                    word = value  # the answer is its word: no bytes to write
                else:
                    if in_words:  # answers with bytes from here on: the ints go first, so that a
                        in_words = False  # journal (and a frame) holds one kind or the other
                        if count:
                            self.flush(count, end)
                            count, look_at = 0, step
                        self._mark(ints=False)  # only now: the head says what the words are
                    if cls is float:
                        put_float(data, end, b"g", value)  # marshal's own bytes for it, in place
                        end += 9
                        kind = _SCALAR
                    else:
                        try:  # a class that can't be hashed raises here too
                            if cls in scalars:
                                kind, blob = _SCALAR, scalar(value, 2)
                            elif cls is _Raised:
                                kind, blob = _FAILED, dumps(_describe(value.exc), -1)
                            else:
                                kind, blob = _DONE, dumps(value, -1)
                        except BaseException as exc:  # the error pickling raised is the task's
                            task = _run_task(run, self.number + count - first)
                            note = (f"The above was raised while pickling the result of {_short(task)}, "
                                    f"a {type(value).__name__}, to send it back: it can't be pickled.")
                            kind, blob = _FAILED, dumps(_describe(exc, note), -1)
                        if end + len(blob) > room:  # full: send what it holds first
                            self.flush(count, end)
                            count = end = 0
                            look_at = step
                            if len(blob) > room:  # too large for the journal: it goes on its own
                                self.send_alone(kind, blob)
                                continue
                        data[end:end + len(blob)] = blob
                        end += len(blob)
                    word = end << 3 | kind
                words[count] = word  # written last: only now does the answer count
                count += 1
                if count >= look_at:
                    # With a timeout the parent must see each task end: it times the next from there.
                    if each or end > room or count > _JOURNAL_ENTRIES - _LOOK or \
                            _now() - flushed > _FLUSH_SECONDS:
                        self.flush(count, end)
                        count = end = 0
                        flushed = _now()
                    look_at = count + step
        self.flush(count, end, (_now() - started) / n)  # to size later batches

    def note_received(self):
        """Tell the parent, should this process die, that the tasks of the message just read began."""
        self.messages += 1
        self._mark()

    def flush(self, count, end, spent=-1.0):
        """Send the journal's answers, in the form the parent reads fastest (see the wire)."""
        if count or spent >= 0:
            kinds = b"" if self.ints else self.words[_LOW:8 * count:8].tobytes().translate(_KIND_OF_BYTE)
            if count and kinds and not kinds.strip(_SCALAR_KINDS):
                self.link.write([_frame_head(_LISTED, count, _MARSHAL_LIST.size + end, spent),
                                 _MARSHAL_LIST.pack(b"[", count), self.data[:end]])
            else:
                form = _WORDS if self.ints else _ENTRIES if kinds.strip(_DONE_KINDS) else _PICKLED
                self.link.write([_frame_head(form, count, 8 * count + end, spent),
                                 self.words[:8 * count], self.data[:end]])
            self.words[:8 * count] = _UNWRITTEN_WORDS[:8 * count]  # empty the journal, then renumber it
            self._sent(count)

    def send_alone(self, kind, blob):
        """One answer, straight down the pipe: too large for the journal, or not a task's."""
        self.link.write([_frame_head(_PICKLED if kind == _DONE else _ENTRIES, 1, 8 + len(blob)),
                         struct.pack("=Q", len(blob) << 3 | kind), blob])
        self._sent(1)

    def _sent(self, count):
        self.number += count
        self._mark()

    def _mark(self, ints=None):
        """Write the journal's head (see the wire); ints: what its words are from now on, said only
        while there are none (a dead worker's words are read as the head says)."""
        self.ints = self.ints if ints is None else ints
        _JOURNAL_HEAD.pack_into(self.head, 0, self.number, self.messages, self.ints)


def _exit_when_closed(lifeline):
    """Worker thread: the parent holds the only other end, so EOF here means it has died."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()  # nothing is ever sent
    os._exit(1)


class _FdLink:
    """One end of a socket-pair Pipe, through its descriptor (POSIX; see the portable path). A
    read takes what has arrived (as much as fits): a frame may come in several, or several in one."""

    def __init__(self, conn):
        self.fd = self.waitable = conn.fileno()
        self.rest = b""  # the start of a frame, read without its end
        self.buffer = memoryview(bytearray(_READ_SIZE))  # reused: malloc would map a fresh one
        self.big = None  # a large frame, read straight into its own buffer
        self.have = 0    # how much of it has arrived

    def read(self):
        """The frames completed by one read (which blocks only if nothing has come); EOFError at the end."""
        got = os.readv(self.fd, [self.buffer if self.big is None else memoryview(self.big)[self.have:]])
        if not got:
            raise EOFError
        if self.big is not None:
            self.have += got
            if self.have < len(self.big):
                return ()
            frame, self.big = self.big, None
            return (frame,)
        data = self.buffer[:got]
        buf = self.rest + data if self.rest else data
        frames, pos, end = [], 0, len(buf)
        unpack = _LENGTH.unpack_from
        while end - pos >= 8:
            n = unpack(buf, pos)[0]
            if pos + 8 + n > end:
                if n >= _BIG_FRAME:
                    self.big = bytearray(n)
                    self.have = end - pos - 8
                    self.big[:self.have] = buf[pos + 8:]
                    pos = end
                break
            frames.append(bytes(buf[pos + 8:pos + 8 + n]))
            pos += 8 + n
        self.rest = bytes(buf[pos:])
        return frames

    def write(self, parts):
        """Write byte buffers as one message: one system call, unless the message is large."""
        written = os.writev(self.fd, parts)
        for part in parts:
            if written < len(part):
                view = memoryview(part)[written:]
                while view:
                    view = view[os.write(self.fd, view):]
            written = max(0, written - len(part))

    def room(self):
        """Bytes the socket takes without blocking the writer (macOS's buffers are small)."""
        with socket.socket(fileno=os.dup(self.fd)) as sock:
            return min(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                       sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


# -- the wire: the one description of its bytes -----------------------------------------------------
#
# A pipe carries frames both ways: a length (_LENGTH, u64) and that many bytes (on the portable
# path, a Connection's message each, without the length). Numbers are little-endian, but for
# entry words, in the machine's order: the worker writes them in place.
#   parent -> worker: a pickled message, (timed, runs) (see _callable); an empty frame asks the
#       worker to exit.
#   worker -> parent: answers. _HEADER: count (u32), form (u8), spent (f64: seconds per task of
#       the message the frame ends, else -1); then by form:
#       _ENTRIES  count entry words (u64: end << 3 | kind, end counted from the first entry's
#                 bytes), then the entries' bytes, back to back
#       _PICKLED  the same, where every entry is a _DONE result: unpickled with no Python loop
#       _LISTED   _MARSHAL_LIST, then the entries' bytes: all _SCALAR, so marshal reads them as a list
#       _WORDS    count words (i64), each an int answer (_INT)
#       _STARTED  nothing more: the worker began its message number `count` (sent only for a
#                 message with a timeout, which counts from there)
#   The kinds of entry: _DONE, a pickled result; _SCALAR, a marshalled one (version 2: no
#   references; half the cost, for _SCALARS); _FAILED, the pickled (text, exception, frames) of
#   _describe; _READY; _INIT_FAILED, the pickled text of the error; _UNREADABLE, the message
#   could not be unpickled; and _INT, an int result held in its word, which has no kind bits:
#   a message's answers are words of ints (one store a task) until one of another kind comes.
# A worker's journal, in shared memory: _JOURNAL_HEAD (the number of its first entry, the
# messages the worker has read, 1 if its words are ints), room for _JOURNAL_ENTRIES words
# (_UNWRITTEN: not written yet), then the entries' bytes. The same words and bytes as a
# frame's (_WORDS, or _ENTRIES): a dead worker's unsent answers are read as a frame's are.

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<IBd")
_ENTRIES, _PICKLED, _LISTED, _WORDS, _STARTED = range(5)
_DONE, _FAILED, _READY, _INIT_FAILED, _UNREADABLE, _SCALAR, _INT = range(7)
_ANSWER_KINDS = (_DONE, _SCALAR, _FAILED, _INT)
# The exact types marshal keeps as they are: a _SCALAR answer is marshalled as its task ends.
_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})
_KIND_OF_BYTE = bytes(b & 7 for b in range(256))  # an entry's kind, from its word's low byte
_LOW = 0 if sys.byteorder == "little" else 7  # where that byte is in a word
_SCALAR_KINDS, _DONE_KINDS = bytes([_SCALAR]), bytes([_DONE])  # an entry's kind, as a byte
# marshal's bytes (version 2) for a list's head, "[" and its length; for a float, "g" and it
_MARSHAL_LIST, _MARSHAL_F64 = struct.Struct("<ci"), struct.Struct("<cd")
_LOOK = 8  # see _Outbox.run
_JOURNAL_HEAD = struct.Struct("<QQQ")
_JOURNAL_ENTRIES = 4096
_UNWRITTEN = -1 << 63  # a word no answer has: no int answer is this small
_UNWRITTEN_WORDS = memoryview(struct.pack("=q", _UNWRITTEN) * _JOURNAL_ENTRIES)
_JOURNAL_DATA = _JOURNAL_HEAD.size + 8 * _JOURNAL_ENTRIES
_JOURNAL_SIZE = _JOURNAL_DATA + (1 << 20)
_FLUSH_SECONDS = 0.02  # a long message's answers are sent this often


def _frame_head(form, count, size, spent=-1.0):
    """A worker's frame, up to its body of `size` bytes."""
    return _LENGTH.pack(_HEADER.size + size) + _HEADER.pack(count, form, spent)


def _entries(buf, words_at, count, data_at):
    """(words, blobs) of `count` entries: their words at words_at, their bytes from data_at."""
    words = struct.unpack_from(f"={count}Q", buf, words_at)
    stops = list(map(add, map(rshift, words, repeat(3)), repeat(data_at)))  # no Python loop
    view = memoryview(buf)
    return words, list(map(view.__getitem__, map(slice, [data_at] + stops[:-1], stops)))


def _unsent_answers(journal, received):
    """(kind, bytes) of each answer in a dead worker's journal that its pipe did not deliver (an
    _INT: the int itself)."""
    mem = memoryview(journal.buffer)
    first, messages, ints = _JOURNAL_HEAD.unpack_from(mem)
    if not messages:  # it has read no message: no answers, and maybe no words set yet
        return []
    words = mem[_JOURNAL_HEAD.size:_JOURNAL_DATA].cast("q").tolist()
    count = words.index(_UNWRITTEN) if _UNWRITTEN in words else len(words)
    skip = max(0, received - first)
    if ints:
        return [(_INT, value) for value in words[skip:count]]
    words, blobs = _entries(mem, _JOURNAL_HEAD.size, count, _JOURNAL_DATA)
    return [(word & 7, blob) for word, blob in zip(words, blobs)][skip:]


# ---------------------------------------------------------------------------------------------
# Workers elsewhere: TaskManager(executor=...) on any concurrent.futures executor
#
# The engine sends batches (a submission costs milliseconds) to an executor, dask's say, whose futures hand their
# outcomes to the turn. The tasks of a failed submission (a dead worker) rerun alone, each blamed only if it fails
# so: a task may run twice, as on dask. A timed task goes alone, as a timeout can't stop it. A probe first checks
# that the workers can import mplite and a function's module: dask hangs on a task it can't unpickle.
#
# To delete this feature: remove this section, TaskManager's `executor` argument and the bytes case of _callable.
# ---------------------------------------------------------------------------------------------

_REMOTE_BATCH_SECONDS = 0.3  # dask's overhead: 15 % at 0.1 s, 3 % at 0.3 s
_REMOTE_MAX_BATCH = 100_000


def _run_remote(token, runs):
    """A submission's tasks, run where the executor runs it: (results, {index: failure}, seconds
    per task), failures as text and pickled, for any serializer. Positional: dask keeps `pure`."""
    started = _now()
    results, failures = [], {}
    for run in runs:
        f, star, items = _callable(run)
        for item in items:
            try:
                results.append(f(*item) if star else f(item))
            except BaseException as exc:  # SystemExit too: it ends the task, not the worker
                failures[len(results)] = _describe(exc)
                results.append(None)
    return results, failures, (_now() - started) / max(1, len(results))


def _import_probe(name):
    """Bytes naming only the standard library, that unpickle as `name` once it is imported."""
    class Module:
        def __reduce__(self):
            return importlib.import_module, (name,)

    class Name:
        def __reduce__(self):
            return getattr, (Module(), "__name__")

    return pickle.dumps(Name(), 2)


class _ExecutorBackend:
    """The backend on a foreign executor. size: submissions run at once (twice that in flight, so none waits)."""
    forked_main = None
    timeout_note = "it may still be running on the executor, which can't stop it"

    def __init__(self, executor):
        self.executor = executor
        self.submitted = {}  # future -> _Message
        self.suspects = deque()  # one-task jobs to rerun alone
        self.probes = {}  # module -> True, None (probing) or ImportError

    def start(self, size):
        self.size = size
        self.engine.ready.set()

    def payload(self, task):
        _check_functions([task], None)  # no payload: the executor pickles it

    def dispatch(self):
        engine = self.engine
        pending = engine.pending_work_items
        while self.suspects or pending:
            if self.suspects:
                if self.running():
                    return  # nothing else of ours may run beside a suspect
                job = self.suspects.popleft()
                self._submit(_Message([job], None, 1, job.owner.timeout is not None, alone=True))
                continue
            timed = pending[0].owner.timeout is not None
            if len(self.submitted) >= (self.size if timed else 2 * self.size):
                return
            free = max(1, self.size - len(self.submitted))
            msg = engine.take_batch(_REMOTE_BATCH_SECONDS, _REMOTE_MAX_BATCH, free, timed_alone=True)
            if msg is None:
                return
            states = list(self._probes(msg.head_task().func))
            error = next((s for s in states if isinstance(s, ImportError)), None)
            if error is not None:
                for job in msg.jobs:
                    engine.refuse(job.owner, job.start, job.stop, error)
            elif None in states:  # probing: the tasks wait, in order
                return engine.requeue(msg.jobs)
            else:
                self._submit(msg)

    def _submit(self, msg):
        try:
            runs = [self._remote_run(job) for job in msg.jobs]
        except _TASK_ERRORS as exc:  # a by-value task that can't be pickled
            if not msg.alone:
                return self._failed(msg, exc)  # find which, one by one
            job = msg.jobs[0]
            return self.engine.refuse(job.owner, job.start, job.stop, UnpicklableTaskError(
                f"{_short(msg.head_task())} can't be sent to the executor: it can't be pickled: {exc}"))
        try:  # a unique token: dask runs identical calls once
            future = self.executor.submit(_run_remote, os.urandom(16), runs)
        except (RuntimeError, futures.BrokenExecutor) as exc:  # shut down, or broken for good
            self.engine.requeue(msg.jobs)
            raise BrokenProcessPool(f"the executor refused work: {exc!r}") from exc
        except Exception as exc:  # it can't take these
            return self._failed(msg, exc)
        msg.where = future
        msg.sent_at = msg.began = _now()
        self.submitted[future] = msg
        future.add_done_callback(functools.partial(self._later, self._landed))

    def _remote_run(self, job):
        """A job's run for _run_remote: a function the workers can't import goes by value."""
        f, star, items = job.owner.run(job.start, job.stop)
        if f is None:
            return None, False, [_pickle(e) if _by_value(e[0]) else e for e in items]
        return (_pickle(f) if _by_value(f) else f), star, items

    def _probes(self, f):
        """The probes of the modules the workers need for f: mplite, and f's unless it goes by value."""
        name = getattr(f, "__module__", None)
        module = sys.modules.get(name)
        ok = name not in ("__main__", "builtins") and module and _importable(name, module)
        for name in {__name__, name} if ok else {__name__}:
            if name not in self.probes:
                try:
                    future = self.executor.submit(pickle.loads, _import_probe(name))
                except Exception:  # it won't: the tasks will tell
                    self.probes[name] = True
                else:
                    self.probes[name] = None
                    future.add_done_callback(functools.partial(self._later, self._probed, name))
            yield self.probes[name]

    def _probed(self, name, future):
        error = None if future.cancelled() else future.exception()
        self.probes[name] = True  # or an error the tasks will meet
        if isinstance(error, ImportError):
            file = getattr(sys.modules.get(name), "__file__", None) or "<its file>"
            self.probes[name] = ImportError(
                f"the executor's workers can't import the module {name!r}: {error}. Make it importable "
                f"there: install it on every worker, or with dask, client.upload_file({file!r})", name=name)

    def _later(self, command, *args):
        """From an executor's thread: have the turn run command(*args)."""
        with contextlib.suppress(RuntimeError):  # the pool has stopped
            self.engine.put(functools.partial(command, *args))

    def _landed(self, future):
        msg = self.submitted.pop(future, None)
        if msg is None or not msg.owed:
            return  # stopped, or past its deadline
        error = futures.CancelledError() if future.cancelled() else future.exception()
        if error is not None:
            return self._failed(msg, error)
        outcome = future.result()
        del future  # dask recomputes a result it holds when its worker dies
        try:
            results, failures, spent = outcome
            if len(results) != msg.owed:
                raise ValueError(f"{len(results)} results for {msg.owed} tasks")
        except (TypeError, ValueError) as exc:  # an executor that calls its own way
            return self._failed(msg, TypeError(f"the executor returned {reprlib.repr(outcome)} for a batch: {exc}"))
        if msg.key is not None:
            self.engine.measured(msg.key, spent)
        start = 0
        for i in sorted(failures):
            self.engine.deliver(msg, results[start:i])
            self.engine.fail_head(msg, _Failure(*failures[i]))
            start = i + 1
        self.engine.deliver(msg, results[start:])

    def _failed(self, msg, error):
        """The executor failed a submission: blame its task if it ran alone, else find which."""
        if msg.alone:
            died = (f"{_short(msg.head_task())} failed on the executor, which gave: "
                    f"{type(error).__name__}: {_clip(str(error), 400)}")
            failure = _Failure.of(WorkerDiedError(died))
            failure.exc.__cause__ = error
            self.engine.fail_head(msg, failure)
        else:
            for job in msg.jobs:
                self.suspects.extend(_Job(job.owner, i, i + 1) for i in range(job.start, job.stop))

    def running(self):
        return [msg for msg in self.submitted.values() if msg.owed]

    def abandon(self, msg):
        pass  # it can't be stopped: its outcome is ignored

    def busy(self):
        return bool(self.suspects or self.running())

    def held_jobs(self):
        return list(self.suspects) + [job for msg in self.running() for job in msg.jobs]

    def forget(self, owner):
        self.suspects = deque(j for j in self.suspects if j.owner is not owner)

    def stop(self, grace):  # the executor is the user's, and goes on
        for future in self.submitted:
            future.cancel()
        self.submitted.clear()


def _by_value(f):
    return type(f) is types.FunctionType and not _by_name(f)


def _executor_slots(executor):
    """How many tasks an executor runs at once: its max_workers, or a dask client's threads."""
    n = getattr(executor, "_max_workers", None)
    if isinstance(n, int) and n > 0:
        return n
    try:  # dask's ClientExecutor (mplite never imports dask)
        return max(1, sum(executor._client.nthreads().values()))
    except Exception:
        return _usable_cpus()


# ---------------------------------------------------------------------------------------------
# Functions that travel by value
#
# A function a worker can't import (a lambda, a closure, anything typed into a notebook, a REPL or `python -c`)
# travels by value: its code (marshal: the workers run the same Python), cells, defaults and the globals it
# uses, into one globals dict per namespace in each worker.
#
# To delete this feature: remove this section and pickle with ForkingPickler.dumps where _pickle is called;
# lambdas, closures and notebook functions are then refused, with pickle's error.
# ---------------------------------------------------------------------------------------------

_CURE = ("move it into a .py module next to your notebook or script and import it from there, "
         "or use context='fork' where available")
# The opcodes that name a global (co_names also holds attribute names: x.tm is no global tm).
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME",
                         "LOAD_FROM_DICT_OR_GLOBALS"})
_MISSING = object()
_is_file = functools.lru_cache(maxsize=8)(os.path.isfile)  # a stat per script
_main_script = weakref.WeakKeyDictionary()  # see _main_file
_code_info_cache = {}  # see _code_info
_kept_globals = {}  # see _reduce_function


def _pickle(obj, forked_main=None, sent=None):
    """obj pickled for a worker (see _ByValuePickler); a PicklingError says why it can't be."""
    pickler = _ByValuePickler(out := io.BytesIO(), forked_main, sent)
    try:
        pickler.dump(obj)
    except _TASK_ERRORS as exc:
        pickler.blame(exc)
        raise
    pickler.sent.update(pickler.fresh)
    return out.getvalue()


@functools.lru_cache(maxsize=4)
def _first_top_level_if(path):
    """The line of the main script's first top-level `if` (inf: none, or no script to read)."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        with open(path, "rb") as source:
            for number, text in enumerate(source, 1):
                if text.startswith((b"if ", b"if(", b"if\t")):
                    return number
    return float("inf")


@functools.lru_cache(maxsize=4)
def _main_guards(path):
    """(first, last) line of each top-level `if __name__ == ...:` block of the main script."""
    import ast  # here: workers never need it
    with contextlib.suppress(OSError, TypeError, ValueError, SyntaxError):
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
        return tuple((node.lineno, node.end_lineno) for node in tree.body
                     if isinstance(node, ast.If) and "__name__" in ast.dump(node.test))
    return ()


def _importable(name, module):
    """Will a worker import this module by name? A spawned one runs __main__ again from its file, if any."""
    spec = getattr(module, "__spec__", None)
    if name != "__main__":
        return spec is not None or hasattr(module, "__file__")  # else made at run time
    if spec is not None:
        return not spec.name.endswith("__main__")
    path = _main_file()
    return path is not None and os.path.basename(path) != "ipython"


def _main_file():
    """The main script's path, kept: Python deletes __main__.__file__ before an executor is done."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if path is not None:
        _main_script[main] = path if _is_file(path) else None
    return _main_script.get(main)


def _by_name(obj):
    """Can a worker import this function or class? Not one of the main script's `if __name__ ==
    ...:` block, which spawned workers skip. Not cached: notebook cells are run again."""
    module = sys.modules.get(obj.__module__)
    if module is None or not _importable(obj.__module__, module):
        return False
    for part in obj.__qualname__.split("."):
        module = getattr(module, part, None)
    if module is not obj:
        return False
    if type(obj) is types.FunctionType and obj.__module__ == "__main__":
        line = obj.__code__.co_firstlineno
        path = _main_file()  # most functions come before the first `if`: no need to parse the script
        return line < _first_top_level_if(path) or not any(a <= line <= b for a, b in _main_guards(path))
    return True


def _stuck_class(cls):
    """A class no worker can import: defined in a function, or in a file-less __main__."""
    return (cls.__module__ == "__main__" or "<locals>" in cls.__qualname__) and not _by_name(cls)


def _code_info(code):
    """(weakref, marshalled code, its globals, those it writes, co_names): once per code (~100 us)."""
    import dis  # as ast in _main_guards
    info = _code_info_cache.get(id(code))
    if info is None or info[0]() is not code:
        names, writes, attrs, todo = set(), set(), set(), [code]
        while todo:
            c = todo.pop()
            attrs.update(c.co_names)
            found = [i for i in dis.get_instructions(c) if i.opname in _GLOBAL_OPS]
            names.update(i.argval for i in found)
            writes.update(i.argval for i in found if not i.opname.startswith("LOAD"))
            todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        ref = weakref.ref(code, lambda _, key=id(code): _code_info_cache.pop(key, None))
        info = _code_info_cache[id(code)] = (ref, marshal.dumps(code), tuple(names), tuple(writes), attrs)
    return info


def _cells(f):
    """{index: value} of f's closure cells; an empty one (not assigned yet) stays empty."""
    cells = {}
    for i, cell in enumerate(f.__closure__ or ()):
        with contextlib.suppress(ValueError):
            cells[i] = cell.cell_contents
    return cells


def _submodules(module, names):
    """Submodules reached as attributes (xml.dom.minidom.parseString), which a worker must import."""
    found = [module]
    for parent in found:  # it grows as submodules are found
        for name in names:
            sub = sys.modules.get(f"{parent.__name__}.{name}")
            if sub is not None and sub not in found:
                found.append(sub)
    return found[1:]


class _ByValuePickler(ForkingPickler):
    """multiprocessing's pickler, sending by value what can't go by name. forked_main: a fork
    pool's {name: class} of the __main__ its workers inherit. sent: per worker, {(namespace,
    name): value} of the globals it holds, not sent again (emptied as new work arrives)."""

    def __init__(self, file, forked_main=None, sent=None):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.forked_main = forked_main
        self.sent = {} if sent is None else sent
        self.fresh = {}
        self.by_value = []

    def reducer_override(self, obj):
        if type(obj) is types.FunctionType:
            return NotImplemented if _by_name(obj) else self._reduce_function(obj)
        if isinstance(obj, type):
            forked = self.forked_main
            if not _stuck_class(obj) or forked is not None and forked.get(obj.__qualname__) is obj:
                return NotImplemented
            why = ("it was defined after the pool's workers were forked" if forked is not None
                   else "it can't be imported by a worker process")
            raise pickle.PicklingError(f"class {obj.__module__}.{obj.__qualname__}: {why}, so neither it "
                                       f"nor its instances can be sent there: {_CURE}")
        if isinstance(obj, types.ModuleType):  # by name (pickle refuses modules)
            if sys.modules.get(obj.__name__) is obj and _importable(obj.__name__, obj):
                return importlib.import_module, (obj.__name__,)
            raise pickle.PicklingError(f"module {obj.__name__!r} can't be imported by a worker process: {_CURE}")
        return NotImplemented

    def _reduce_function(self, f):
        _, code, names, writes, used = _code_info(f.__code__)
        g = f.__globals__
        module = sys.modules.get(f.__module__)
        shared = module is not None and module.__dict__ is g and _importable(f.__module__, module)
        _kept_globals[id(g)] = g  # so that no other dict takes its id
        namespace = (f.__module__, os.getpid(), id(g), shared)  # see _namespace
        values = {n: g[n] for n in names if n in g and n != "__builtins__"}
        modules = [sub for v in values.values() if isinstance(v, types.ModuleType)
                   for sub in _submodules(v, used)]
        values = {n: v for n, v in values.items() if self.sent.get((namespace, n), _MISSING) is not v}
        self.fresh.update({(namespace, n): v for n, v in values.items()})
        attrs = {"__qualname__": f.__qualname__}
        for attr in ("__defaults__", "__kwdefaults__", "__doc__", "__dict__"):
            if getattr(f, attr):
                attrs[attr] = getattr(f, attr)
        if f.__annotations__:  # a class that can't travel goes as its name
            attrs["__annotations__"] = {k: v.__qualname__ if isinstance(v, type) and _stuck_class(v) else v
                                        for k, v in f.__annotations__.items()}
        self.by_value.append(f)
        # With a state setter, pickle memoizes the bare function before it pickles the state:
        # so a function that reaches itself (recursion, f -> g -> f, its own closure) works.
        state = (namespace, values, writes, _cells(f), attrs, modules)
        return _function_skeleton, (code, f.__name__, namespace), state, None, None, _function_setstate

    def blame(self, error):
        """After a failure: raise a PicklingError naming which value of a by-value function can't be pickled."""
        for f in reversed(self.by_value):  # innermost first
            g, free = f.__globals__, f.__code__.co_freevars
            parts = [(f"global {n!r}", g[n]) for n in _code_info(f.__code__)[2] if n in g]
            parts += [(f"closure variable {free[i]!r}", v) for i, v in _cells(f).items()]
            parts += [("default value", v) for v in f.__defaults__ or ()]
            parts += [(f"default for {k!r}", v) for k, v in (f.__kwdefaults__ or {}).items()]
            for what, value in parts:
                if type(value) is types.FunctionType and not _by_name(value):
                    continue  # looked at on its own
                try:
                    _ByValuePickler(io.BytesIO(), self.forked_main).dump(value)
                except _TASK_ERRORS as exc:
                    cure = "" if _CURE in str(exc) else (
                        "; define the function at the top level of a .py module and import it, or "
                        "create that value in the worker (in worker_init, say)")
                    why = (f"function {f.__module__}.{f.__qualname__} can't be sent to a worker process by "
                           f"value: its {what}, a {type(value).__qualname__}, can't be pickled: {exc}{cure}")
                    raise pickle.PicklingError(why) from error


# The worker's side, which pickle finds by name. _namespaces: (module, parent pid, id of its
# globals there, shared) -> globals dict; _assigned: id of one here -> the names its functions assign.
_namespaces = {}
_assigned = {}


def _namespace(key):
    """Its one globals dict here: an importable module's own, else a new one (not __main__'s)."""
    if key not in _namespaces:
        name, _, _, shared = key
        fresh = {"__builtins__": builtins, "__name__": name}
        _namespaces[key] = vars(importlib.import_module(name)) if shared else fresh
    return _namespaces[key]


def _function_skeleton(code, name, key):
    code = marshal.loads(code)
    cells = tuple(types.CellType() for _ in code.co_freevars) or None
    return types.FunctionType(code, _namespace(key), name, None, cells)


def _function_setstate(f, state):
    key, values, writes, cells, attrs, _ = state  # _: submodules, imported already
    namespace = _namespace(key)
    # A module's own values win. In a notebook's, a name its functions assign (`global model` in
    # a worker_init) stays the worker's once there, not the parent's stale copy; others update.
    assigned = _assigned.setdefault(id(namespace), set())
    keep = namespace.keys() if key[3] else assigned & namespace.keys()
    namespace.update({n: v for n, v in values.items() if n not in keep})
    assigned.update(writes)
    for i, value in cells.items():
        f.__closure__[i].cell_contents = value
    for attr, value in attrs.items():
        setattr(f, attr, value)


# ---------------------------------------------------------------------------------------------
# Pipes, and the portable path
#
# A link moves frames (see the wire) over one end of a Pipe. On POSIX, _FdLink (above) uses the socket's
# descriptor (one system call a message, no copies), and the engine sleeps in epoll. The portable path (Windows,
# or MPLITE_PORTABLE=1: CI runs the suite both ways on Linux) uses only what multiprocessing documents and tests
# on Windows: _ConnLink, a frame a Connection's message; _WaitSelector, connection.wait(), which takes at most 63
# handles (the wake-up, a pipe per worker and a starting worker's sentinel: at most 61 workers); _PortableWakeUp,
# a Pipe. A worker's death shows on its sentinel until it is ready, then on its pipe: a Windows parent holds a
# copy of the child's end until the child, done importing the main script, takes it over, so a worker that dies
# before (an unguarded script, say) closes no pipe. The portable path keeps that copy until then on every system.
# Only the engine thread runs the turn there: wait() can't be shared between threads.
#
# To delete the portable path (POSIX only then): remove this section, use _FdLink, selectors.DefaultSelector and
# _PipeWakeUp in its place, and the _PORTABLE cases of _Engine._hold_turn, _exit_fd and _Processes.
# ---------------------------------------------------------------------------------------------

class _ConnLink:
    """One end of a Pipe, through its Connection's messages only (a frame each, without its length)."""

    def __init__(self, conn):
        self.conn = self.waitable = conn

    def write(self, parts):
        self.conn.send_bytes(b"".join(parts), _LENGTH.size)

    def read(self):
        return (self.conn.recv_bytes(),)

    def room(self):
        """A Windows named pipe's buffer, as multiprocessing makes it."""
        return 8192


class _WaitSelector(dict):
    """What the engine uses of selectors' interface, over multiprocessing.connection.wait()."""

    def register(self, obj, events, data):
        self[obj] = selectors.SelectorKey(obj, None, events, data)

    def select(self, timeout=None):
        return [(self[obj], selectors.EVENT_READ) for obj in wait(list(self), timeout)]

    unregister = dict.__delitem__
    close = dict.clear


class _PortableWakeUp:
    """_PipeWakeUp (see there) over a multiprocessing Pipe, which wait() takes on every system."""

    def __init__(self):
        self.waitable, self.w = Pipe(duplex=False)
        self.rung = False

    def ring(self):
        if not self.rung:
            self.rung = True
            with contextlib.suppress(OSError):  # the engine has stopped
                self.w.send_bytes(b"")

    def clear(self):
        while self.waitable.poll():
            self.waitable.recv_bytes()
        self.rung = False

    def close(self):
        self.waitable.close()
        self.w.close()


_PORTABLE = sys.platform == "win32" or os.environ.get("MPLITE_PORTABLE") == "1"
if _PORTABLE:
    _Link, _Selector, _WakeUp = _ConnLink, _WaitSelector, _PortableWakeUp
else:
    _Link, _Selector, _WakeUp = _FdLink, selectors.DefaultSelector, _PipeWakeUp
_HANDLES = 63 if _PORTABLE else None
_MAX_WORKERS = 61 if _PORTABLE else None


# ---------------------------------------------------------------------------------------------
# Errors: what a failed task's result is made of
# ---------------------------------------------------------------------------------------------

class _Failure:
    """A task's error, as the engine hands it to its owner: text, what str mode returns; blob, the pickled
    exception, if it survives a round trip; frames, (filename, lineno, name) of the worker's traceback;
    exc, the exception, for errors made in the parent; refused: the task could not even be sent."""
    __slots__ = ("text", "blob", "frames", "exc", "refused")

    def __init__(self, text, blob=None, frames=(), exc=None, refused=False):
        self.text = text
        self.blob = blob
        self.frames = frames
        self.exc = exc
        self.refused = refused

    @classmethod
    def of(cls, exc, refused=False):
        """An error raised on a task's behalf in the parent: a dead worker, a timeout."""
        return cls(_describe(exc)[0], exc=exc, refused=refused)

    def exception(self, remote=False):
        """The exception to raise in the caller, with the worker's traceback (remote: as text in __cause__ too)."""
        exc = self.exc
        if exc is None:
            try:
                exc = pickle.loads(self.blob)
            except _TASK_ERRORS:
                last = self.text.rstrip().splitlines()[-1]
                exc = RuntimeError(f"{last} (the task's exception could not be sent back as it is)")
        if self.frames:
            exc = exc.with_traceback(_rebuild_traceback(self.frames))
        if remote and self.exc is None and exc.__cause__ is None:  # raised in a worker
            exc.__cause__ = _RemoteTraceback(f'\n"""\n{self.text}\n"""')
        return exc


def _describe(exc, note=None):
    """(text, pickled exception or None, frames) of an exception: what travels back for it, without the first
    frame (ours, where the task was called). note: a last paragraph for the text, saying what mplite did."""
    tb = exc.__traceback__
    tb = tb and tb.tb_next
    if tb and tb.tb_frame.f_code is _call_entry.__code__:  # ours too, for a task that travels alone
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")
    if note:
        text += "\n\n" + note
    # A spawned worker runs the main script as __mp_main__: name its classes as the parent does.
    text = text.replace("\n__mp_main__.", "\n")
    if not text.startswith("Traceback"):
        text = "Traceback (most recent call last):\n" + text
    frames = [(fs.filename, fs.lineno, fs.name) for fs in traceback.extract_tb(tb)]
    try:
        blob = pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but can't be rebuilt (a different __init__)
    except BaseException:
        blob = None
    return text, blob, frames


class _RebuiltFrame(Exception):
    pass


def _rebuild_traceback(frames):
    """A traceback whose frames point at the worker's files, lines and functions: each a `raise` compiled at that
    line of that file, in code named after the function, padded to the real line's length (nothing underlined)."""
    tb = None
    for filename, lineno, name in reversed(frames):
        lineno = lineno or 1
        width = len(linecache.getline(filename, lineno).rstrip())
        stand_in = "raise (_RebuiltFrame" + " " * max(0, width - 21) + ")"
        code = compile("\n" * (lineno - 1) + stand_in, filename, "exec")
        try:
            exec(code.replace(co_name=name), {"_RebuiltFrame": _RebuiltFrame})
        except _RebuiltFrame as marker:
            frame = marker.__traceback__.tb_next.tb_frame
        tb = types.TracebackType(tb, frame, frame.f_lasti, lineno)
    return tb


# Windows: a process that crashed exits with the NTSTATUS of the crash, as an unsigned number.
_CRASHES = {0xC0000005: "an access violation", 0xC00000FD: "a stack overflow",
            0xC0000094: "an integer division by zero", 0xC000001D: "an illegal instruction",
            0xC0000409: "a stack buffer overrun (a failed check of the C runtime)",
            0xC0000374: "a corrupted heap", 0xC0000017: "running out of memory",
            0xC000013A: "Ctrl-C", 0x80000003: "a breakpoint"}


def _exit_reason(code):
    """How a worker ended, in words, from its exit code, on any system (None: reaped in active_children())."""
    if code is None:
        return "ended (its exit status was collected elsewhere)"
    if code in _CRASHES:
        return f"crashed with {_CRASHES[code]} (exit code {code:#010x})"
    if code >= 0:
        return f"exited with code {code}"
    name = f"signal {-code}"
    with contextlib.suppress(ValueError):
        name = signal.Signals(-code).name
    oom = " (possibly out of memory)" if -code == getattr(signal, "SIGKILL", None) else ""
    return f"was killed by {name}{oom}"


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _name(f):
    return getattr(f, "__name__", None) or repr(f)


def _short(task):
    """A task's repr, kept short: errors name the task, and its arguments may be huge."""
    return f"Task(f={_name(task.f)}, *{reprlib.repr(task.args)}, **{reprlib.repr(task.kwargs)})"


def _next_step(chain, result):
    step = None if chain.next is None else chain.next(chain.task, result)
    if step is not None and not isinstance(step, (Task, TaskChain)):
        raise TypeError(f"next_task returned {type(step).__name__}; expected a Task, TaskChain or None")
    return step


def _entry_task(item):
    return item.task if isinstance(item, TaskChain) else item


def _entry(item):
    task = _entry_task(item)
    return task.f, task.args, task.kwargs


def _one_function(tasks):
    """Do these Tasks all call the same function?"""
    return all(map(is_, repeat(tasks[0].func), map(_task_func, tasks)))


def _check_functions(tasks, forked_main):
    """Refuse a call whose function can't travel, even by value, before any task is sent (tasks: one per
    distinct function, the usual case). Arguments are checked as batches are pickled."""
    for task in tasks:
        _pickle_task(task, forked_main, task.f)


def _pickle_task(task, forked_main=None, part=None):
    """The task pickled for a worker (or only `part` of it), or UnpicklableTaskError naming it."""
    try:
        return _pickle((task.f, task.args, task.kwargs) if part is None else part, forked_main)
    except _TASK_ERRORS as exc:
        raise UnpicklableTaskError(f"{_short(task)} can't be sent to a worker process: "
                                   f"it can't be pickled: {exc}") from exc


def _clip(text, most):
    """text, cut in the middle to at most about `most` characters."""
    return text if len(text) <= most else f"{text[:most // 2]} ... {text[-most // 2:]}"


def _usable_cpus():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(n, _MAX_WORKERS or n)


def _checked(value, name, kind=float, zero_ok=False):
    """value, checked: None, or over 0 (zero_ok: or 0; never NaN), an int or (kind float) any number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, kind)):
        what = "an int" if kind is int else "a number of seconds"
        raise TypeError(f"{name} must be {what} or None, not {value!r}")
    if not (value >= 0 if zero_ok else value > 0) or value != value:
        raise ValueError(f"{name} must be {'0 or more' if zero_ok else 'more than 0'}, not {value!r}")
    return value


def _mappable(f):
    """A Task of f, to check that it can travel; or why f can't be mapped."""
    if not callable(f):
        raise TypeError(f"map needs a callable, not {f!r}")
    return Task(f)


def _task_list(tasks):
    """(the tasks as a list, the set of their types), or why they are no tasks."""
    try:
        tasks = list(tasks)
    except TypeError:
        raise TypeError(f"execute takes an iterable of Task or TaskChain, not {type(tasks).__name__}") from None
    kinds = set(map(type, tasks))
    if not kinds <= {Task, TaskChain}:  # else look closer: subclasses are fine
        for i, t in enumerate(tasks):
            if not isinstance(t, (Task, TaskChain)):
                raise TypeError(f"execute takes Task or TaskChain items; item {i} is {type(t).__name__}")
    return tasks, kinds


# ---------------------------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------------------------

def _progress_bar(total, tqdm, pbar, progress):
    if pbar is not None and not callable(getattr(pbar, "update", None)):
        raise TypeError(f"pbar must have an update(n) method; {type(pbar).__name__} has none")
    if tqdm is not None and not callable(tqdm):
        raise TypeError(f"tqdm must be a tqdm-like class, not {tqdm!r}")
    if pbar is not None or not progress:
        return pbar
    return _ProgressBar(total) if tqdm is None else tqdm(total=total, unit="tasks")


class _ProgressBar:
    """A text bar on stderr in tqdm's look: ` 45%|████▌     | 45/100 [00:02<00:03, 17.30tasks/s]`. On a terminal it
    redraws one line, at most 10 times a second; in a log, whole lines: first, at growing intervals, last."""

    def __init__(self, total):
        self.file = sys.stderr
        self.total = total
        self.n = self.drawn_n = self.width = 0
        self.start = self.drawn = _now()
        self.tty = False
        with contextlib.suppress(AttributeError, ValueError):
            self.tty = self.file.isatty()
        self.interval = 0.1 if self.tty else 5.0
        self.blocks = " ▏▎▍▌▋▊▉█"
        try:
            self.blocks.encode(getattr(self.file, "encoding", None) or "ascii")
        except (UnicodeEncodeError, LookupError):
            self.blocks = " 123456789#"
        self._draw(self.start)

    def update(self, n=1):
        self.n += n
        now = _now()
        if now - self.drawn >= self.interval:
            self._draw(now)
            if not self.tty:
                self.interval = min(2 * self.interval, 60.0)

    def close(self):
        if self.tty or self.n != self.drawn_n:  # in a log, a line already written stands
            self._draw(_now(), end="\n")

    def _draw(self, now, end=""):
        """end: on a terminal, what ends the line (a log's lines all end in a newline)."""
        n, total, elapsed = self.n, self.total, now - self.start
        self.drawn, self.drawn_n = now, n
        frac = n / total if total else 1.0
        width, levels = 10, len(self.blocks) - 1
        full, part = divmod(int(frac * width * levels), levels)
        bar = (self.blocks[-1] * full + (self.blocks[part] if full < width else "")).ljust(width)
        remaining, speed = "?", "?tasks/s"
        if elapsed > 0 and n:
            rate = n / elapsed
            remaining = _clock((total - n) / rate)
            speed = f"{rate:5.2f}tasks/s" if rate >= 1 else f"{1 / rate:5.2f}s/tasks"
        line = f"{frac * 100:3.0f}%|{bar}| {n}/{total} [{_clock(elapsed)}<{remaining}, {speed}]"
        if self.tty:  # pad, to cover a longer line drawn before
            line, self.width = "\r" + line.ljust(self.width) + end, max(self.width, len(line))
        with contextlib.suppress(OSError, ValueError):  # a broken stream must not break the work
            self.file.write(line if self.tty else line + "\n")
            self.file.flush()


def _clock(seconds):
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# ---------------------------------------------------------------------------------------------
# Self-test: python -m mplite
# ---------------------------------------------------------------------------------------------

def _showcase_f(seconds, hello):
    time.sleep(seconds)
    return seconds / hello


def _broken(*args):
    raise NotImplementedError("this task must fail!")


def _self_test():
    checks = []

    def check(what, ok, detail=""):
        checks.append(ok)
        print(f"  [{'ok' if ok else 'FAILED'}] {what}" + (f": {detail}" if detail and not ok else ""))

    print(f"mplite {__version__} self-test (Python {sys.version.split()[0]}, {_usable_cpus()} CPUs)")
    start = time.perf_counter()
    with TaskManager() as tm:
        print(f"  started {tm.cpu_count} workers with the 'spawn' start method")
        tasks = [Task(_showcase_f, arg / 100, hello=arg) for arg in list(range(10)) * 5]
        results = tm.execute(tasks, progress=False)
        errors = [r for r in results if isinstance(r, str)]
        values = [r for r in results if not isinstance(r, str)]
        check("50 tasks with args and kwargs, results in order",
              len(results) == 50 and all(abs(v - 0.01) < 1e-9 for v in values), repr(results[:3]))
        good = [e for e in errors if e.startswith("Traceback (most recent call last):")
                and e.endswith("ZeroDivisionError: float division by zero")]
        check("5 tasks dividing by zero return their tracebacks", len(good) == len(errors) == 5, repr(errors[:1]))
        results = tm.execute([Task(_broken, i) for i in range(3)], progress=False)
        check("the same pool takes more work; failing tasks don't crash it",
              all(r.splitlines()[-1] == "NotImplementedError: this task must fail!" for r in results), repr(results))
        for a in range(1, 10, 2):
            tm.submit(Task(add, a, a + 1))
        sums = []
        while tm.open_tasks:
            sums.append(tm.take(timeout=None))
            if len(sums) == 2:
                tm.submit(Task(add, *sums))
                sums = []
        check("incremental work with submit/take adds 1..10 to 55", sums == [55], repr(sums))
        chain = TaskChain(Task(add, 20, 0), lambda prev_task, result: Task(add, result, 1))
        check("a task chain runs step after step", tm.execute([chain], progress=False) == [21])
    if all(checks):
        print(f"all {len(checks)} checks passed in {time.perf_counter() - start:.1f} s")
        return 0
    print(f"{checks.count(False)} of {len(checks)} checks FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(_self_test())
