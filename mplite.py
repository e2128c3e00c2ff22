"""mplite: a process pool in one file, whose tasks can't crash it.

    from mplite import TaskManager, Task

    def add(a, b=0):
        return a + b

    if __name__ == "__main__":
        with TaskManager() as tm:
            print(tm.execute([Task(add, i, b=1) for i in range(5)]))   # [1, 2, 3, 4, 5]
            print(tm.map(add, [1, 2, 3]))                               # [1, 2, 3]
            tm.submit(Task(add, 40, 2))
            print(tm.take(timeout=None))                                # 42

``execute`` returns results in input order; ``map`` and ``imap`` do the same for one function, ``imap`` lazily.
A task that raises, kills its worker or runs past its ``timeout`` gets the error as its result; the others run
on, and a dead worker is replaced. Task functions may be lambdas, closures, or typed into a notebook: what the
workers can't import travels by value. The pool works in the background, for any number of threads at once;
code written for ``concurrent.futures`` or asyncio gets the same engine through ``ProcessPoolExecutor``:

    from mplite import ProcessPoolExecutor

    with ProcessPoolExecutor() as ex:
        future = ex.submit(add, 40, 2)          # a concurrent.futures.Future
        print(future.result())                  # 42
        print(list(ex.map(add, [1, 2], [3, 4])))  # [4, 6]

``TaskManager(executor=client.get_executor())`` runs the same tasks on any other ``concurrent.futures``
executor, a dask cluster say. ``python -m mplite`` runs a self-test.

The file reads top down: the public API; the engine (a diagram at its head), its worker processes and the
wire; the foreign-executor backend; functions by value; the portable path; errors and helpers; the progress
bar; the self-test.

Standard library only, Python 3.8+, Linux, macOS and Windows. MIT licence.
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
    """A function call to run in a worker: ``Task(f, *args, **kwargs)``.

    A functools.partial with mplite's names for its parts: ``f``, ``args``, ``kwargs`` and a unique ``id``.
    Being one, it is built in C, at half the cost of a class of our own: users build a Task per tiny task,
    often millions of them.
    """
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
        """Run the task here, in this process; exceptions propagate. Handy for checking a task."""
        return self()


class TaskChain:
    """A task whose result decides what runs next, like a promise.

    ``next_task(prev_task, result)`` returns the next ``Task`` or ``TaskChain``, or None to end the chain with
    ``result``. In ``TaskManager.execute`` the chain's place in the results gets the result of its last task.
    ``next_task`` runs in the parent, on the thread that runs the engine at that moment (mplite's engine thread,
    or a caller waiting for results), so it must not wait for results itself; a waiting chain blocks nothing else.
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
    """A pool of worker processes that runs Tasks.

    cpu_count: number of workers (default: the CPUs this process may use).
    context: "spawn" (the default, also for None), "fork", "forkserver" or a multiprocessing context.
    worker_init: a Task run once in every worker before it takes work.
    error_mode: "str" (a failed task's result is its traceback text) or "exception" (the
        task's exception is raised in the caller, with the worker's traceback).
    timeout: seconds a task may run, counted from its start in a worker; the worker of a task
        over its limit is stopped and replaced, and the task's result is a TimeoutError.
    max_tasks_per_child: replace each worker after this many tasks (for leaky code).
    executor: a concurrent.futures.Executor to run the tasks on instead of mplite's own worker processes, dask's
        client.get_executor() say (README: "Past one machine"). cpu_count is then how many batches run at once
        (default: its max_workers, or a dask cluster's threads). The executor is yours: stop() leaves it running.

    Use it as a context manager, or call start() and stop(). Once started, the pool works in
    the background, and every method may be called from any number of threads at once.
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
        """Run tasks (Task or TaskChain) and return their results in input order.

        progress: show a progress bar on stderr. tqdm: a tqdm-compatible class to draw it
        instead; pbar: an object with update(n) to report to instead.
        timeout: seconds per task for this call (default: the manager's timeout).
        """
        engine = self._running()
        call = _Call(*_task_list(tasks), self._timeout(timeout), self._errors)
        _check_functions(call.distinct_tasks(), engine.backend.forked_main)
        return self._call(engine, call, tqdm, pbar, progress)

    def map(self, f, iterable, *, progress=False, timeout=_DEFAULT):
        """``execute([Task(f, x) for x in iterable])``: the results of f(x), in order."""
        engine = self._running()
        _check_functions([_mappable(f)], engine.backend.forked_main)
        return self._call(engine, _Mapped(list(iterable), self._timeout(timeout), self._errors, f),
                          None, None, progress)

    def imap(self, f, iterable, *, timeout=_DEFAULT):
        """map() as an iterator: the results of f(x), in order, as they come.

        The input is read as the results are taken, a little ahead of them: it may be endless, and the memory
        used doesn't grow with its length. Closing the iterator (or leaving a for loop over it) drops the tasks
        not yet taken. An error raised by the input itself is raised after the results of the items before it.
        """
        engine = self._running()
        _check_functions([_mappable(f)], engine.backend.forked_main)
        return self._stream(engine, f, iter(iterable), self._timeout(timeout))

    def _call(self, engine, call, tqdm, pbar, progress):  # execute() and map()
        bar = _progress_bar(len(call.items), tqdm, pbar, progress and bool(call.items))
        if not call.items:
            return []
        engine.refuse_inside_turn()  # before its work is queued: nobody would wait for it
        try:
            engine.put(_Job(call, 0, len(call.items)))
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

    def _stream(self, engine, f, inputs, timeout):
        """imap(): the window starts at a few tasks per worker and grows with the results taken, up to a
        limit: what is read ahead stays bounded, and small for a consumer that takes few results."""
        engine.refuse_inside_turn()
        limit = 4 * _MAX_BATCH * self._cpu_count
        stream = _Stream(engine, f, False, inputs, timeout,
                         lambda taken: min(limit, max(4 * self._cpu_count, taken)))
        yield from stream.results(lambda call: self._wait(engine, call.done), self._unpack_failure)

    def _unpack_failure(self, failure):
        if self.error_mode == "exception":
            raise failure.exception()
        return failure.text

    @property
    def _errors(self):
        return _RAISE if self.error_mode == "exception" else _TEXT

    def _timeout(self, timeout):
        return self.timeout if timeout is _DEFAULT else _seconds(timeout, "timeout")

    def submit(self, task, *, timeout=_DEFAULT):
        """Queue a Task or TaskChain to run; returns its id. Collect it with take() or as_completed()."""
        engine = self._running()
        if not isinstance(task, (Task, TaskChain)):
            raise TypeError(f"submit takes a Task or TaskChain, not {type(task).__name__}")
        timeout = self._timeout(timeout)
        payload = engine.backend.payload(_entry_task(task))
        inbox = engine.inbox
        inbox.opened(1)
        try:
            engine.put(_Job(_Submitted(task, timeout, inbox), 0, 1, payload))
        except BaseException:
            inbox.opened(-1)
            raise
        try:
            engine.send_now()  # from this thread, at once
        except KeyboardInterrupt:  # as in a wait: the pool stops at once
            self._stop(0, engine)
            raise
        return task.id

    def take(self, timeout=0):
        """One finished result of a submitted task, or None if none is ready. timeout=0 returns at once; a number
        waits up to that many seconds; None waits until a result is ready (None at once if no task is open)."""
        timeout = _seconds(timeout, "timeout", zero_ok=True)
        engine = self._running()
        finished = self._wait(engine, None, timeout)
        if finished is not None and finished is not _TIMED_OUT:
            return self._unpack(finished)[1]

    def as_completed(self, timeout=None):
        """Yield (task, result) for each submitted task as it finishes, until none is open.
        timeout: seconds for the whole iteration; past it, TimeoutError is raised."""
        timeout = _seconds(timeout, "timeout")
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
            yield self._unpack(finished)

    @property
    def open_tasks(self):
        """Tasks submitted and not yet taken."""
        engine = self._engine
        return 0 if engine is None else engine.inbox.open

    def _running(self):
        engine = self._engine
        if engine is None:
            raise RuntimeError("the TaskManager is not running: use `with TaskManager() as tm:` or call start()")
        if engine.closed:
            raise engine.refusal()
        return engine

    def _wait(self, engine, event, timeout=None):
        """Wait through the engine for a threading.Event, or (None) for the inbox's next task.
        Ctrl-C stops the pool at once: no process is left."""
        try:
            if event is None:
                return engine.inbox.get(engine, timeout)
            return engine.wait(event.is_set, event.wait, timeout)
        except KeyboardInterrupt:
            self._stop(0, engine)
            raise

    def _unpack(self, finished):
        item, ok, value = finished
        return item, (value if ok else self._unpack_failure(value))


class ProcessPoolExecutor(futures.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on mplite's engine: change one import.

    As the standard library's, with mplite's guarantees: a task that kills its worker fails only its own future
    (with WorkerDiedError, a BrokenProcessPool), the executor goes on; a task past ``timeout`` seconds fails with
    TimeoutError and its worker is replaced; a future's exception carries the worker's traceback. mp_context=None
    means spawn; batching is automatic, so ``map``'s chunksize is accepted and ignored. A future counts as
    running once it is assigned to a worker: until then cancel() and shutdown(cancel_futures=True) cancel it.
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
        # Dropped without shutdown(): finish the work, then stop. Nothing the engine or a map()
        # iterator holds refers back to the executor, so it can be collected while they go on.
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
            self._engine.put(_Job(_FutureTask(future, Task._of(fn, args, kwargs), self._timeout), 0, 1))
        self._engine.send_now()  # not under the lock: callbacks that submit again may run here
        return future

    submit.__doc__ = futures.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Like ``map(fn, *iterables)``, each call run in a worker; results in order, lazily.

        timeout: seconds from this call for the whole iteration (concurrent.futures.TimeoutError).
        buffersize: at most this many calls sent ahead of the results taken (None: all at once; as Python 3.14's).
        """
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
        # Calls travel in chunks (of _Mapped), not a Future each. With no buffersize, all of
        # them are sent now, as the standard library's map() does; with one, that many.
        stream = _Stream(engine, fn, True, zip(*iterables), self._timeout,
                         lambda taken: buffersize or sys.maxsize, functools.partial(_refuse_after, self._shut))
        stream.top_up()  # the first calls go now, as the standard library's do
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
    return (_context(context), _positive_int(_usable_cpus() if size is None else size, size_name),
            _seconds(timeout, "timeout"),
            None if max_tasks is None else _positive_int(max_tasks, "max_tasks_per_child"))


def _refuse_after(shut):
    if shut.is_set():
        raise RuntimeError("cannot schedule new futures after shutdown")


def _raise_remote(failure):
    """Raise a task's failure as the standard library's executor does: with the worker's
    traceback as text in __cause__ (and, from mplite, its frames in the traceback)."""
    raise failure.exception(remote=True)


class UnpicklableTaskError(TypeError, pickle.PicklingError):
    """A task whose function or arguments can't travel to a worker, even by value: a lock, an
    open file, an instance of a class typed into a notebook. Lambdas and closures can."""


class WorkerDiedError(ChildProcessError, BrokenProcessPool):
    """A task's worker process died while running it (killed, crashed, os._exit()).

    A ChildProcessError, as in mplite 1.x, and a BrokenProcessPool, so that code written for
    concurrent.futures catches it too; only that task fails, the pool goes on.
    """


# ---------------------------------------------------------------------------------------------
# Owners: what callers wait on, which the engine fills in
#
# Every piece of work belongs to an owner: an execute() or map() call (_Call), a chunk of a stream (_Mapped),
# a submitted task (_Submitted, whose result goes to the inbox), or a future (_FutureTask). The engine speaks to
# every owner the same way: claim() before it sends a task, deliver(slot, ok, value) for each finished task,
# where a failed task's value is a _Failure (deliver_results for a run of plain results at once), and
# stopped(error) for work that will never finish. The owner alone decides what a failure becomes: text, an
# exception raised in its caller, or a future's exception. Callers wait through _Engine.wait(), and nothing else.
# ---------------------------------------------------------------------------------------------

_TIMED_OUT = object()
# What user code can raise while its task is pickled, unpickled or chained, to fail that task
# alone (SystemExit too: a __reduce__ that calls sys.exit() must not stop mplite's engine).
_TASK_ERRORS = (Exception, SystemExit)
_REDRAW_SECONDS = 0.1  # how often a waiting execute() redraws its progress bar
_STREAM_CHUNK = 4096   # the most tasks a streamed map's chunk holds
# What a _Call does with a task's failure: put its text in the task's place, fail the whole
# call (execute() raises it), or keep the _Failure in its place (a stream raises it there).
_TEXT, _RAISE, _KEEP = "text", "raise", "keep"


class _Owner:
    __slots__ = ()
    plain = False      # its items are Tasks whose results go straight in: deliver_results()
    cancelled = False  # it wants no more results
    key = None         # the timing key of all its tasks, where they share one function

    def task(self, slot):
        """The Task that runs next for a slot (errors name it)."""
        return _entry_task(self.items[slot])

    def run(self, start, stop):
        """The tasks of slots start..stop as they travel: a run of a message (see _calls)."""
        return None, False, [_entry(item) for item in self.items[start:stop]]

    def key_of(self, slot):
        """What the engine measures the duration of this slot's task by: its function."""
        return self.key or _timing_key(self.task(slot).func)

    def claim(self):
        """The engine is about to send one of its jobs: may it go?"""
        return True

    def cancel(self, start, stop):
        """shutdown(cancel_futures=True) before these slots were sent: True if they are done with."""
        return False

    def stopped(self, error):
        """The pool stopped (or broke) before this work was done."""


class _Call(_Owner):
    """One execute() call: its tasks, their results in input order, and how many are to come."""
    __slots__ = ("items", "results", "left", "timeout", "errors", "plain", "f", "key",
                 "failure", "cancelled", "shown", "done")

    def __init__(self, items, kinds, timeout, errors, f=None):
        self.items = items  # what runs next for each slot: a Task, or a TaskChain's current step
        self.results = [None] * len(items)
        self.left = len(items)
        self.timeout = timeout
        self.errors = errors
        self.plain = f is not None or kinds == {Task}  # no chains: results go straight in
        self.f = f  # the one function of every task, which have no keyword arguments; or None
        one = f is not None or (self.plain and items and _one_function(items))
        if f is None and one and not any(map(_task_keywords, items)):
            self.f = items[0].func
        self.key = _timing_key(f or items[0].func) if one and items else None
        self.failure = None
        self.cancelled = False
        self.shown = 0
        self.done = threading.Event()

    def run(self, start, stop):
        if self.f is None:
            return _Owner.run(self, start, stop)
        return self.f, True, list(map(_task_args, self.items[start:stop]))

    def distinct_tasks(self):
        """One task for each distinct function of the call."""
        if self.key is not None:
            return [self.task(0)] if self.items else []
        return {id(task.func): task for task in map(_entry_task, self.items)}.values()

    def deliver_results(self, start, values):
        """Results of the tasks start, start+1, ... at once (no chains among them)."""
        if not self.cancelled:
            self.results[start:start + len(values)] = values
            self.left -= len(values)
            if not self.left:
                self.done.set()

    def deliver(self, slot, ok, value):
        if not (ok or self.errors == _KEEP or self.cancelled):
            if self.errors == _RAISE or value.refused:  # refused: it can't even be sent, bad input
                return self.abort(value)
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
    """One map() call, or a chunk of a streamed one: f(x) (or with star, f(*x)) for each x of
    items, with no Task made for each."""
    __slots__ = ("star",)

    def __init__(self, items, timeout, errors, f, star=False):
        super().__init__(items, None, timeout, errors, f)
        self.star = star

    def task(self, slot):
        return Task(self.f, *self.items[slot]) if self.star else Task(self.f, self.items[slot])

    def run(self, start, stop):
        return self.f, self.star, self.items[start:stop]


class _Stream:
    """An iterator of a function's results over an input, in order, for imap() and ProcessPoolExecutor.map().
    The input goes out in chunks (_Mapped calls), at most window(taken) inputs ahead of the results taken."""

    def __init__(self, engine, f, star, inputs, timeout, window, may_send=None):
        self.engine = engine
        self.may_send = may_send  # called before each chunk goes: raises if it may not
        self.f, self.star, self.timeout = f, star, timeout
        self.inputs = inputs  # None once it is exhausted
        self.window = window
        self.calls = deque()  # chunks sent and not yet taken, in input order
        self.taken = 0        # results taken
        self.ahead = 0        # inputs read and not yet taken
        self.error = None     # what the input raised: raised after the results of the items before it

    def top_up(self):
        """Send chunks of the input until the window is full."""
        window = self.window(self.taken)
        while self.error is None and self.inputs is not None and self.ahead < window:
            # Chunks double from one task up to _STREAM_CHUNK: the first results come soon,
            # and a consumer that stops early leaves little run for nothing.
            size = min(max(1, window // 4), _STREAM_CHUNK, window - self.ahead, max(1, self.taken + self.ahead))
            chunk = []
            try:
                chunk.extend(itertools.islice(self.inputs, size))
            except Exception as exc:  # the items read before it are in the chunk
                self.error = exc
            if not chunk:
                self.inputs = None
                break
            if self.may_send is not None:
                self.may_send()
            call = _Mapped(chunk, self.timeout, _KEEP, self.f, self.star)
            self.engine.put(_Job(call, 0, len(chunk)))
            self.calls.append(call)
            self.ahead += len(chunk)

    def results(self, wait, raise_error):
        """The results: wait(call) waits for a chunk; raise_error(failure) turns a task's
        failure into what the caller raises, or returns what takes the task's place. Each
        result is let go once it is yielded: the caller alone decides how long it lives."""
        calls = self.calls
        try:
            while True:
                self.top_up()
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
        self.item = item
        self.items = [item]
        self.timeout = timeout
        self.inbox = inbox
        self.plain = item.__class__ is Task  # no chain to go on with
        self.key = _timing_key(item.func) if self.plain else None

    def deliver_results(self, start, values):
        self.inbox.put((self.item, True, values[0]))

    def deliver(self, slot, ok, value):
        self.inbox.put((self.item, ok, value))


class _Inbox:
    """Finished submitted tasks, until take() or as_completed() hands each to one caller."""

    def __init__(self):
        self.ready = threading.Condition(threading.Lock())
        self.finished = deque()  # (item, ok, value)
        self.open = 0            # submitted and not yet taken
        self.error = None        # why no more will come: the pool stopped

    def opened(self, n):
        with self.ready:
            self._count(n)

    def put(self, finished):
        with self.ready:
            self.finished.append(finished)
            self.ready.notify()

    def has_news(self):
        return bool(self.finished) or not self.open or self.error is not None

    def sleep(self, seconds):
        with self.ready:
            if not self.has_news():
                self.ready.wait(seconds)

    def get(self, engine, timeout):
        """The next finished task; None if no task is open; _TIMED_OUT after timeout seconds."""
        deadline = None if timeout is None else _now() + timeout
        while True:
            with self.ready:
                if self.finished:
                    self._count(-1)
                    return self.finished.popleft()
                if self.error is not None:
                    raise RuntimeError(self.error)
                if not self.open:
                    return None
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                return _TIMED_OUT
            engine.wait(self.has_news, self.sleep, left)

    def _count(self, n):
        self.open += n
        if not self.open:  # those waiting for more get None: nothing is open
            self.ready.notify_all()

    def close(self, error):
        with self.ready:
            self.error = str(error)
            self.finished.clear()
            self.open = 0
            self.ready.notify_all()


class _Future(futures.Future):
    """The executor's futures: a concurrent.futures.Future whose result() and exception() run mplite's engine
    while they wait (see _Engine.wait), so a result reaches its caller with no thread hand-off."""

    def __init__(self, engine):
        super().__init__()
        self._engine = engine

    def _sleep(self, seconds):
        with self._condition:
            if not self.done():
                self._condition.wait(seconds)

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
        if self.claimed is None:  # else asked before: back in the queue, its worker died before it began
            self.claimed = self.future.set_running_or_notify_cancel()
        return self.claimed

    def cancel(self, start, stop):
        return self.claimed is not True and self.future.cancel()

    def deliver_results(self, start, values):
        self._settle(self.future.set_result, values[0])

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
#  [turn]    the engine's turn: requests ─► pending_work_items ─► take_batch() ─► a _Message
#               │                     (whoever holds the turn: the engine thread, or a caller
#               │                      that is waiting for results; see _Engine.wait)
#               ├─ _Processes:  the message, pickled ─► the worker's pipe
#               │     [worker process]  runs each task, writes its answer to its journal,
#               │                       sends the answers down the pipe ─► [turn] reads them
#               └─ _ExecutorBackend:  executor.submit(_run_remote, batch)
#                     [executor's worker]  runs the batch, returns the answers
#                     [executor's thread]  the future is done ─► put(command) ─► [turn]
#               ▼
#  [turn]    deliver(): each answer to its owner; a TaskChain's next step goes back in the queue
#               ▼
#  [caller]  the owner (a _Call's Event, the inbox, a Future) is done: its caller returns,
#            if it wasn't the one holding the turn already
#
# The engine core (_Engine) owns the requests, the queue, the owners, the loop, timeouts,
# delivery and shutdown. A backend owns where tasks run: _Processes (mplite's own workers) or
# _ExecutorBackend (any concurrent.futures executor). The engine drives it through start(),
# payload() (a submitted task, checked), dispatch() (send queued work to free workers),
# running() and abandon() (for timeouts), busy(), held_jobs(), forget() (an owner that wants
# no more) and stop(); the backend answers through deliver(), fail_head(), measured(),
# requeue() and refuse(), and registers what it waits on with the engine's selector.
#
# One owner of the engine state at any moment: whoever holds _turn_lock. The engine thread
# holds it except while it sleeps; a caller about to wait for results takes it when it is free
# and runs the turns itself, so an answer reaches it with no thread hand-off, and submit()
# sends its task at once. Both sleep in the same selector (epoll, or wait() on the portable
# path): a result, a death, a new request or the clock wakes them, and nothing polls. So work
# moves, timeouts fire and dead workers are replaced whether or not anybody is inside an
# mplite call, and any number of threads can use one pool.
#
# Fork and threads: with the fork start method, replacement workers are forked by whoever
# holds the turn while other threads run. The engine holds no lock of its own but the turn
# then, and a worker never uses it. A lock that one of *your* threads holds at that moment
# stays held in the worker (see the README); spawn and forkserver workers start clean.
# ---------------------------------------------------------------------------------------------

# A caller waits in slices this long: a Ctrl-C that another thread of the program took (the
# kernel gives a process's SIGINT to any thread), or any Ctrl-C on Windows before Python 3.14,
# is raised only once its wait returns.
_WAKE_SECONDS = 0.5
# Batch sizing: tasks of one function travel together, as many as make this much work by
# their measured duration; a function not yet measured travels alone until it is.
_BATCH_SECONDS = 0.004
_MAX_BATCH = 1024
_LINGER_SECONDS = 0.01  # see _Engine._run
_PATIENCE_SECONDS = 0.001  # how long a caller waits for the turn, before it waits for its owner
_AHEAD_SECONDS = 0.008  # a busy worker is sent its next message only if it is this close to done
_TIMED_KEYS = 4096      # durations kept for at most this many functions
_UNPICKLE_SECONDS = 60  # the most a message may take to unpickle where its tasks have a timeout


class _Job:
    """Tasks of one owner that travel together: owner.items[start:stop], run in that order.

    A job in flight shrinks from the front as answers arrive, so its start is always the task
    that runs now. alone: it travels in a message of its own (a chain's next step)."""
    __slots__ = ("owner", "start", "stop", "payload", "alone")

    def __init__(self, owner, start, stop, payload=None, alone=False):
        self.owner = owner
        self.start = start
        self.stop = stop
        self.payload = payload  # a single task, pickled alone, where it must travel that way
        self.alone = alone


class _Message:
    """One message in flight, the one record of it: its tasks (jobs, in the order they run),
    how many of them are still owed an answer, and when the first of those began."""
    __slots__ = ("jobs", "owed", "key", "timed", "alone", "began", "sent_at", "skip", "number", "where")

    def __init__(self, jobs, key, owed, timed, alone=False):
        self.jobs = deque(jobs)
        self.owed = owed
        self.key = key        # the function all its tasks call, as _timing_key gives it
        self.timed = timed    # a task of it has a timeout
        self.alone = alone    # travels alone: a chain's next step; on an executor, a suspect
        self.began = None     # when its first owed task began, as seen here; None: not known yet
        self.sent_at = None
        self.skip = 0         # answers still to come for tasks that failed at their deadline
        self.number = 0       # its place among the messages sent to its worker
        self.where = None     # the worker, or the executor's future, that holds it

    def pop_head(self):
        """(owner, slot) of the first task owed, which is no longer owed."""
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
    """The engine core, driving a backend. Callers (any thread) use start(), put(), send_now(),
    wait(), drop() and close(); everything else runs in the turn (see above)."""

    def __init__(self, backend, size, drain_at_exit=False):
        self.backend = backend
        backend.engine = self
        self.size = size
        self.drain_at_exit = drain_at_exit  # finish the queued work at interpreter exit (executor)
        self.inbox = _Inbox()
        self.ready = threading.Event()  # every worker is ready, or the pool broke first
        self.failure = None             # why the pool broke by itself (a BrokenProcessPool)
        self.closed = False             # it takes no more requests
        self.thread = None
        # Shared between callers and the turn, under _lock:
        self._lock = threading.Lock()
        self._requests = deque()  # jobs and commands, for the turn
        self._closing = None      # (grace, drain, error) once close() was asked for
        # Who holds the turn, and who sleeps: written by the holder, read by callers.
        self._turn_lock = threading.Lock()
        self.turn_holder = None     # the thread id of the holder, while it runs (not sleeps)
        self.caller_turns = 0       # turns callers have held: the engine thread's sleep may be stale
        self.thread_asleep = False  # the engine thread sleeps, or is about to, without the turn
        self.caller_asleep = False  # a caller holding the turn sleeps
        self.thread_wakes_at = None
        self.soonest = None         # the next deadline of a task, as the last turn saw it
        self.caller_left_at = -1.0  # when a caller last let go of the turn
        self.followers = 0          # callers waiting on their owner while another holds the turn
        # The turn's own:
        self.pending_work_items = deque()  # jobs waiting for a worker, in order
        self.durations = {}  # timing key -> seconds per task, as measured
        self.arrivals = 0    # jobs handed over so far (see _Worker.globals_sent)
        self.timeouts = False  # a task with a timeout came: deadlines are looked at from then on

    # -- what callers use, from any thread -------------------------------------------------------

    def start(self):
        """Start the backend (its workers start in the caller's thread: see _Processes.start)
        and the engine thread. Returns at once, not waiting for the workers to be ready."""
        self.pid = os.getpid()
        _live_engines.add(self)
        self.wake_up = _WakeUp()
        self.selector = _Selector()
        self.selector.register(self.wake_up.waitable, selectors.EVENT_READ, None)
        self.wake_only = _Selector()
        self.wake_only.register(self.wake_up.waitable, selectors.EVENT_READ, None)
        try:
            self.backend.start(self.size)
        except BaseException:
            self.backend.stop(0)
            self._close_files()
            raise
        atexit.register(self._at_exit)
        self.thread = threading.Thread(target=self._run, name="mplite-engine", daemon=True)
        # The engine thread never takes a Ctrl-C: the kernel gives a process's SIGINT to any
        # thread that doesn't block it, and one taken there would not wake the main thread
        # where it waits for results (a lock's wait is cut short only by a signal to its own thread).
        with _sigint_blocked():
            self.thread.start()

    def put(self, request):
        """Hand the turn a _Job to run, or a command (a callable) to run there."""
        with self._lock:
            if self.closed:
                raise self.refusal()
            self._requests.append(request)
        if self.thread_asleep or self.caller_asleep:
            self.wake_up.ring()

    def send_now(self):
        """If nobody holds the turn, take it for a moment and send what was put (submit(): no
        hand-off). Call it holding no lock of your own: done-callbacks may run here."""
        if self._hold_turn():
            self._in_turn(self._prepare)

    def _in_turn(self, work):
        """work() in a turn this caller holds, then let go. An error fails the pool; a Ctrl-C
        does too unless it came while asleep (work() says so), and reaches the caller."""
        try:
            work()
        except KeyboardInterrupt:
            if not self.caller_asleep:  # in the middle of the engine's work: its state may be torn
                self._fail(KeyboardInterrupt("interrupted while this thread ran mplite's engine"))
            raise
        except BaseException as exc:
            self._fail(exc)
        finally:
            self.caller_asleep = False
            self._release_turn()

    def wait(self, done, sleep, timeout=None):
        """Wait until done() or for timeout seconds (None: no limit); return done().

        The one way callers wait. While nobody holds the turn, the caller takes it and runs
        the engine itself until done (leader/follower: the engine thread takes over once it
        lets go); else it sleep(seconds)s on its owner. Either way in slices, so that Ctrl-C
        reaches it (see _WAKE_SECONDS).
        """
        if done():
            return True
        self.refuse_inside_turn()
        deadline = None if timeout is None else _now() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - _now())
            span = _WAKE_SECONDS if left is None else min(left, _WAKE_SECONDS)
            if not self._lead(done, span) and span:
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
        """Drop calls nobody waits for any more (an imap() left early): their queued tasks go,
        results of those already sent are ignored."""
        try:
            self.put(functools.partial(self._drop, list(calls)))
        except RuntimeError:  # the pool has stopped: nothing is left to drop
            pass

    def refusal(self):
        """The error for a request that comes after the pool closed."""
        if self.failure is not None:
            return BrokenProcessPool(f"the pool is broken: {self.failure}")
        return RuntimeError("the pool has been stopped: no more tasks can be submitted")

    def raise_if_broken(self):
        if self.failure is not None:  # a fresh one: its traceback is the caller's, not the engine's
            raise type(self.failure)(*self.failure.args)

    def close(self, grace=0.2, drain=False, wait=True):
        """Stop the pool: at once, or (drain) once the work already handed over is done.

        The workers get `grace` seconds to exit before they are terminated. wait: return once
        all that is done. A close at once overrides a draining one asked for before.
        """
        if os.getpid() != self.pid or self.thread is None:  # a fork of the parent doesn't own the pool
            return
        with self._lock:
            if self._closing is None or (self._closing[1] and not drain):
                self._closing = (grace, drain, None)
        self.wake_up.ring()
        if wait and threading.current_thread() is not self.thread and self.turn_holder != threading.get_ident():
            while self.thread.is_alive():
                self.thread.join(_WAKE_SECONDS)  # in slices: Ctrl-C on Windows

    def _at_exit(self):
        # An executor finishes what it was given, as the standard library's does; not after a
        # Ctrl-C ended the program, nor for a TaskManager, which stops at once.
        interrupted = getattr(sys, "last_type", None) is KeyboardInterrupt
        self.close(drain=self.drain_at_exit and not interrupted)

    # -- the turn --------------------------------------------------------------------------------

    def _hold_turn(self):
        """Take the turn for this caller: True if taken. The engine thread holds it only for
        moments, never while it sleeps; another caller may hold it longer: then, False."""
        me = threading.get_ident()
        if _PORTABLE or self._closing is not None or self.turn_holder == me or \
                not self._turn_lock.acquire(timeout=_PATIENCE_SECONDS):
            return False  # on the portable path, only the engine thread runs it (see there)
        self.turn_holder = me
        self.caller_turns += 1
        return True

    def _release_turn(self):
        """Let go of a caller's turn. The engine thread, asleep, may need to wake: for work
        that came meanwhile, or a deadline sooner than it planned to wake for."""
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
        """Run turns on this caller's thread for up to `span` seconds, until done(); False if
        another thread holds the turn."""
        if not self._hold_turn():
            return False
        until = _now() + span

        def turns():
            while True:  # at least once: a wait of no time still reads what has come
                timeout = self._prepare()  # it may run commands that deliver: done() now?
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
        """The engine thread: the turn whenever no caller holds it.

        For _LINGER_SECONDS after a waiting caller let go of the turn, it watches only the
        wake-up: that caller is likely back soon, and two threads woken by every answer would
        fight for the GIL. Answers nobody waits for wait that long at most; requests, and the
        deadlines of timeouts, wake it as always."""
        me, error, events, seen = threading.get_ident(), None, (), -1
        try:
            while True:
                self._take_turn_back()
                try:
                    self.turn_holder = me
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
                    self.turn_holder = None
                    self._turn_lock.release()
                events = selector.select(timeout)  # without the turn: a caller may take it
                self.thread_asleep = False
        except BrokenProcessPool as exc:
            error = exc
        except BaseException as exc:  # a bug of ours: fail every caller, rather than hang one
            error = BrokenProcessPool(f"mplite's engine failed:\n{_describe(exc)[0]}")
        self._take_turn_back()
        self.turn_holder = me
        self._shut_down(error)
        self.turn_holder = None
        self._turn_lock.release()

    def _take_turn_back(self):
        """The engine thread takes the turn, waiting for a caller that holds it. A Ctrl-C may
        stop a caller just after it took the lock, before it said so: the lock is then held by
        nobody, for good. Seen so twice, a quarter of a second apart, the turn is taken as it is."""
        orphaned = 0
        while not self._turn_lock.acquire(timeout=0.25):
            orphaned = orphaned + 1 if self.turn_holder is None else 0
            if orphaned == 2:
                return

    def _prepare(self):
        """Take the requests, send work, enforce timeouts. Returns seconds until the next
        deadline (None: none), or False once the engine is to close."""
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
        """The turn failed in a caller's thread: the engine thread shuts the pool down."""
        error = exc if isinstance(exc, BrokenProcessPool) else BrokenProcessPool(
            f"mplite's engine failed:\n{_describe(exc)[0]}")
        with self._lock:
            self._closing = (0, False, error)
        self.wake_up.ring()

    def _idle(self):
        return not (self.pending_work_items or self._requests or self.backend.busy())

    def _shut_down(self, error):
        """Tell every waiting caller the pool is gone, then stop the workers."""
        closing = self._closing or (0, False, None)
        error = error or closing[2]
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
        self.backend.stop(closing[0])
        self._close_files()

    def _close_files(self):
        self.selector.close()
        self.wake_only.close()
        self.wake_up.close()

    # -- what runs in the turn, for the backend --------------------------------------------------

    def take_batch(self, seconds, most, timed_alone=False):
        """The next message to send: queued tasks of one function, as many as make `seconds`
        of work by that function's measured duration (at most `most`), or one while it is not
        measured yet; fewer near the end of the queue, so that the last tasks spread over all
        the workers. None if nothing waits. timed_alone: a task with a timeout travels alone."""
        pending, jobs, count, timed = self.pending_work_items, [], 0, False
        while pending:
            job = pending[0]
            owner = job.owner
            if owner.cancelled or (not jobs and not owner.claim()):  # a cancelled future, say
                pending.popleft()
                continue
            key = owner.key_of(job.start)
            if not jobs:
                first, per = key, self.durations.get(key)
                n = 1 if per is None or job.alone or (timed_alone and owner.timeout is not None) else \
                    max(1, min(most, int(seconds / max(per, 1e-7))))
                if n > 1:
                    n = min(n, ceil(self._queued(2 * self.size * n) / (2 * self.size)))
            elif key != first or job.alone or (timed_alone and owner.timeout is not None) or not owner.claim():
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
        """Tasks queued, counted up to `enough`."""
        count = 0
        for job in self.pending_work_items:
            count += job.stop - job.start
            if count >= enough:
                break
        return count

    def measured(self, key, seconds):
        """A message of the function `key` took this many seconds per task."""
        durations = self.durations
        old = durations.get(key)
        if old is None:
            if len(durations) >= _TIMED_KEYS:
                durations.clear()
            durations[key] = seconds
        else:
            durations[key] = old + 0.3 * (seconds - old)

    def requeue(self, jobs):
        """Jobs that never began go back to the front of the queue, in order."""
        self.pending_work_items.extendleft(reversed([j for j in jobs if j.start < j.stop]))

    def deliver(self, msg, values):
        """Results of the tasks at the front of msg, in the order they ran: the hot path."""
        if msg.skip:  # the first answers are of tasks already failed at their deadline
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
        """The first task owed in msg failed."""
        if msg.skip:
            msg.skip -= 1
            return
        owner, slot = msg.pop_head()
        self.finish(owner, slot, False, failure)

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
        """Tasks that can't be sent: each gets the error as its own, and its owner decides
        (an execute() or map() fails, as for bad input)."""
        failure = _Failure.of(error, refused=True)
        for slot in range(start, stop):
            self.finish(owner, slot, False, failure)

    def _enforce_timeouts(self, now):
        """Fail each task past its timeout, and have the backend let go of it; seconds to the
        next deadline, or None. A timeout counts from the task's start: while a worker
        unpickles its message (which may import modules for a while), only a generous limit
        applies."""
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

    def _forget(self, owner):
        """Drop the queued jobs of an owner that wants no more; results of the others are ignored."""
        self._keep_pending(lambda job: job.owner is not owner)
        self.backend.forget(owner)

    def _keep_pending(self, keep):
        """Filter the queue in place: the backends' loops hold it."""
        kept = [job for job in self.pending_work_items if keep(job)]
        self.pending_work_items.clear()
        self.pending_work_items.extend(kept)

    def _drop(self, calls):
        for call in calls:
            call.cancelled = True
            self._forget(call)

    def cancel_pending(self):
        """A command: shutdown(cancel_futures=True). Each free worker is assigned its next
        task first, since a future counts as running once assigned; the rest are cancelled."""
        self.backend.dispatch()
        self._keep_pending(lambda job: not job.owner.cancel(job.start, job.stop))


_live_engines = weakref.WeakSet()


def _timing_key(f):
    """What a task's duration is measured by, the same for every call of one function: its
    code (lambdas made in a loop share it; a bound method's is its function's); a partial's
    function's; a class, or a built-in function or method, by its name; any other callable
    object by its type (a new one per task must not be a new, unmeasured function each)."""
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
    """A blocked SIGINT is inherited: a worker started meanwhile stays deaf to Ctrl-C until it
    ignores it, so no worker prints a KeyboardInterrupt. (Windows has no signal masks.)"""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _PipeWakeUp:
    """What rings a sleeping turn: a pipe whose read end the engine always waits on. It rings
    once until the turn clears it, so the pipe never fills. (The turn that clears it takes the
    requests next: a ring skipped because it had rung already loses nothing.)"""

    def __init__(self):
        self.waitable, self.w = os.pipe()
        os.set_blocking(self.waitable, False)
        self.rung = False
        self.lock = threading.Lock()  # ring() and close(): a closed descriptor's number may be
        # another file's by now, and must not be written to

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
        # Only now: a ring skipped meanwhile came with a request that the turn takes next.
        self.rung = False

    def close(self):
        with self.lock:
            w, self.w = self.w, None
        os.close(self.waitable)
        os.close(w)


# ---------------------------------------------------------------------------------------------
# mplite's own workers: the backend and the worker's loop
#
# Every worker has a Pipe and a journal in shared memory. The turn sends it messages of
# tasks; the worker writes each answer to its journal as the task ends, and sends the journal
# down the pipe in one write when the message is done (or every few milliseconds): a system
# call costs more than a tiny task. If the worker dies, the turn reads the answers it missed
# from the journal (they are numbered): a dead worker costs only the task it was running,
# finished tasks keep their results, and no task runs twice. A worker's deque of _Messages is
# the one record of what it holds: the first is running.
# ---------------------------------------------------------------------------------------------

_READ_SIZE = 1 << 18
_BIG_FRAME = 1 << 20  # a frame larger than this is read straight into its own buffer
# A message sent ahead to a busy worker is small enough for the socket's buffer: a large one
# waits for an idle worker, which is reading, so the turn never blocks on a worker that is
# itself blocked sending a large result.
_AHEAD_BYTES = 1 << 16
_BOOT_DEATHS = 50  # workers killed before they were ready, in a row, before we give up
_GUARD_CURE = (" If the script starts the pool at its top level, start it under `if __name__ == "
               "\"__main__\":` instead: each worker process imports the main script again.")


class _Worker:
    """One worker process, its pipe, and the messages it holds."""

    def __init__(self, process, conn, journal, max_tasks):
        self.process = process
        self.sentinel = _exit_fd(process)
        self.conn = conn
        self.link = _Link(conn)
        self.ahead_bytes = min(_AHEAD_BYTES, self.link.room() // 2)
        self.journal = journal   # shared memory: answers it wrote and may not have sent
        self.messages = deque()  # _Messages sent and not yet answered, in running order
        self.sent = 0            # messages sent to it: each one's number
        self.received = 0        # answers read from its pipe
        self.ready = False       # has said it is ready (worker_init done)
        self.open = True         # may be sent more work
        self.killed = False      # stopped by the turn: its running task was past its timeout
        self.eof = False         # its end of the pipe is closed
        self.gone = False        # reaped
        self.left = max_tasks    # tasks it may still be sent (max_tasks_per_child), None: no limit
        self.globals_sent = {}   # globals of by-value functions it was sent: see _pickle
        self.globals_since = 0   # the engine's arrivals when that record began
        self.child_end = None    # the portable path keeps the child's end until it is ready
        self.done_key = None     # the timing key of the last message it finished
        self.reader = _FrameReader()

    def send(self, body):
        self.link.write([_LENGTH.pack(len(body)), body])

    def began_head(self):
        """Has the worker begun the first message it holds (read it, at least)?"""
        return _JOURNAL_HEAD.unpack_from(self.journal.buffer)[1] >= self.messages[0].number

    def close(self):
        """Its pipe, sentinel, process and journal go now, not when the collector finds them."""
        self.conn.close()
        if self.child_end is not None:
            self.child_end.close()
        if self.sentinel != self.process.sentinel:
            os.close(self.sentinel)
        self.process.close()  # ended and joined
        self.journal = None

    def receive(self):
        return self.reader.read(self.link)

class _Processes:
    """The backend of mplite's own worker processes (see above). Turn only, but start()."""
    timeout_note = "its worker process was stopped"

    def __init__(self, ctx, init, max_tasks, init_label):
        self.ctx = ctx
        self.init = init
        self.init_label = init_label  # what errors call init: "worker_init" or "initializer"
        self.max_tasks = max_tasks
        self.fork = ctx.get_start_method() == "fork"
        self.forked_main = None  # fork: the classes of __main__ the workers inherit (see _pickle)
        self.workers = []
        self.missing = 0         # workers to start: at first, and to replace those that ended
        self.boot_deaths = 0
        self.large_head = None   # the queued job whose message was too large to send ahead

    def payload(self, task):
        """A submit()ted task as it travels, pickled now: it fails here, naming the task, if it can't."""
        return _pickle_task(task, self.forked_main)

    def start(self, size):
        """Start the workers in the caller's thread: spawned workers import the main script from
        __main__.__file__, which Python deletes once the script is done."""
        if _MAX_WORKERS is not None and size > _MAX_WORKERS:
            raise ValueError(f"at most {_MAX_WORKERS} workers on this system, not {size}")
        _main_file()  # remember it while the script runs
        if self.fork:
            main = vars(sys.modules["__main__"])
            self.forked_main = weakref.WeakValueDictionary({k: v for k, v in main.items() if isinstance(v, type)})
        self.init_blob = None  # what the workers get of init: see _worker_main
        if self.init is not None:
            init = self.init
            try:  # pickled like a task, to run in the same namespace as the tasks
                self.init_blob = _pickle_task(init, self.forked_main)
            except UnpicklableTaskError:  # say which init can't travel, before starting anything
                if not self.fork:
                    raise
                self.init_blob = (init.f, init.args, init.kwargs)  # a forked worker inherits it
        self.lifeline, self.lifeline_end = self.ctx.Pipe(duplex=False)
        self.missing = size
        self._start_missing()

    def _start_missing(self):
        # wait() takes at most _HANDLES: the wake-up, a pipe per worker, and while it starts,
        # its process's sentinel too (see the portable path).
        while self.missing and (_HANDLES is None or 3 + sum(2 - w.ready for w in self.workers) <= _HANDLES):
            self.missing -= 1
            self._spawn()

    def _spawn(self):
        conn, child_conn = self.ctx.Pipe()
        journal = Arena(_JOURNAL_SIZE)  # RawArray's shared memory, without its 10 ms ctypes import
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
        w = _Worker(process, conn, journal, self.max_tasks)
        if _PORTABLE:
            w.child_end = child_conn  # see the portable path: until the worker is ready
        else:
            child_conn.close()
        self.workers.append(w)
        selector = self.engine.selector
        selector.register(w.sentinel, selectors.EVENT_READ, functools.partial(self._reap, w))
        selector.register(w.link.waitable, selectors.EVENT_READ, functools.partial(self._read, w))

    # -- sending ---------------------------------------------------------------------------------

    def dispatch(self):
        """Work to the workers with none first (those still starting too); then, where no
        worker is free, one message ahead to each busy worker about to be done with short tasks."""
        self._start_missing()
        pending = self.engine.pending_work_items
        for w in self.workers:
            if not pending:
                return
            if w.open and not w.messages:
                self._send(w, False)
        if not pending or pending[0] is self.large_head:
            return
        self.large_head = None
        now = _now()
        for w in self.workers:
            if not pending:
                return
            if w.open and w.ready and len(w.messages) == 1 and self._ends_soon(w.messages[0], now):
                self._send(w, True)

    def _ends_soon(self, msg, now):
        """Will msg be done within _AHEAD_SECONDS, as measured, and is it on time? A task sent
        ahead can't be taken back: nothing goes behind a long task, or a stuck one."""
        per = self.engine.durations.get(msg.key)
        if per is None or msg.began is None:
            return False
        expected = per * msg.owed
        return expected <= _AHEAD_SECONDS and now - msg.began <= 2 * expected + _BATCH_SECONDS

    def _send(self, w, ahead):
        engine = self.engine
        if w.globals_since != engine.arrivals:  # new work came: send globals afresh (see _pickle)
            w.globals_sent, w.globals_since = {}, engine.arrivals
        sent = w.globals_sent.copy() if ahead else w.globals_sent  # it may turn out too large to go
        most = _MAX_BATCH if w.left is None else min(_MAX_BATCH, w.left)
        body = None
        while body is None:  # None: none of those could be pickled; try the next ones
            msg = engine.take_batch(_BATCH_SECONDS, most)
            if msg is None:
                return
            body = self._pickle_message(msg, sent)
        if ahead and len(body) > w.ahead_bytes:
            engine.requeue(msg.jobs)
            self.large_head = engine.pending_work_items[0]
            return
        w.globals_sent = sent
        w.sent += 1
        msg.number, msg.where, msg.sent_at = w.sent, w, _now()
        if not w.messages and not msg.timed:
            msg.began = msg.sent_at
        w.messages.append(msg)
        try:
            w.send(body)
        except OSError:  # the worker is gone; these jobs never reached it, its sentinel will tell
            w.messages.pop()
            w.sent -= 1
            w.open = False
            return engine.requeue(msg.jobs)
        if w.left is not None:
            w.left -= msg.owed
            if w.left == 0:  # max_tasks_per_child: it exits after these, and is replaced
                w.open = False
                with contextlib.suppress(OSError):
                    w.send(b"")

    def _pickle_message(self, msg, sent):
        """The message's body, or None if none of its tasks can be pickled (they have failed).
        sent: what the worker holds of the globals of functions sent by value (see _pickle)."""
        if all(j.payload is not None for j in msg.jobs):  # pickled already (submitted tasks)
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
            frames = w.receive()
        except (EOFError, OSError):
            w.eof = True
            self.engine.selector.unregister(w.link.waitable)
            if _PORTABLE and w.ready:  # its pipe closed: it has ended (see the portable path)
                self._reap(w)
            return
        now = _now()
        for frame in frames:
            self._take(w, frame, now)
        if w.link.buffered:  # a portable link read a message larger than the read buffer
            self._read(w)

    def _take(self, w, frame, now):
        """The answers in one of a worker's frames: the hot path, a few C calls per frame."""
        count, form, spent = _HEADER.unpack_from(frame)
        if form == _STARTED:  # the worker began the message numbered `count`
            if w.messages and w.messages[0].number == count:
                w.messages[0].began = now
            return
        w.received += count
        if not count:  # the time its message took, after the answers went on their own
            if w.done_key is not None and spent >= 0:
                self.engine.measured(w.done_key, spent)
            return
        if form == _LISTED:
            self.engine.deliver(w.messages[0], pickle.loads(memoryview(frame)[_HEADER.size:]))
        else:
            words, blobs = _entries(frame, _HEADER.size, count, _HEADER.size + 8 * count)
            values = None
            if form == _PICKLED:
                try:
                    values = list(map(pickle.loads, blobs))  # no Python loop
                except _TASK_ERRORS:  # one of them can't be unpickled here: one by one, below
                    pass
            if values is not None:
                self.engine.deliver(w.messages[0], values)
            elif not any([self._take_one(w, word & 7, blob) for word, blob in zip(words, blobs)]):
                return  # no task's answer among them
        self._progress(w, spent, now)

    def _take_one(self, w, kind, blob):
        if kind in _ANSWER_KINDS:
            msg = w.messages[0]
            try:
                value = marshal.loads(blob) if kind == _SCALAR else pickle.loads(blob)
            except _TASK_ERRORS as exc:  # a result the parent can't unpickle: an error of that task
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
            for msg in w.messages:  # sent while it booted: a timeout's grace counts from now
                msg.sent_at = _now()
            if w.child_end is not None:  # the portable path: its pipe tells of its death now
                w.child_end.close()
                w.child_end = None
                self.engine.selector.unregister(w.sentinel)
            if not self.missing and all(w.ready for w in self.workers):
                self.engine.ready.set()  # start() returns
        elif kind == _INIT_FAILED:
            raise BrokenProcessPool(f"{self.init_label} {_short(self.init)} failed in a worker process:\n"
                                    f"{pickle.loads(blob)}")
        else:  # _UNREADABLE: a task of its head message can't be unpickled there: one by one
            msg = w.messages.popleft()
            w.globals_sent = {}  # it may have stopped before the globals that message carried
            self.engine.requeue([single for job in msg.jobs for single in self._singles(job)])
            if w.messages:
                w.messages[0].began = None if w.messages[0].timed else _now()
        return False

    def _progress(self, w, spent, now):
        """After answers: measure the message's function once it is done; the next task began now."""
        messages = w.messages
        if not messages:
            return
        msg = messages[0]
        if spent >= 0:
            self.engine.measured(msg.key, spent)
        if msg.owed or msg.skip:  # the next task began as this one ended
            msg.began = now
            return
        w.done_key = messages.popleft().key
        if messages:
            head = messages[0]
            head.began = None if head.timed else now

    # -- faults, and the end ---------------------------------------------------------------------

    def _reap(self, w):
        """A worker process has ended: collect what it sent, charge its running task, replace it."""
        if w.gone:
            return
        engine = self.engine
        while not w.eof and wait([w.link.waitable], 0):
            try:
                frames = w.receive()
            except (EOFError, OSError):
                break
            for frame in frames:
                self._take(w, frame, _now())
        w.process.join()
        number, (words, blobs) = _journal_answers(w.journal)
        for word, blob in zip(words, blobs):
            if number >= w.received:  # finished and written down, never sent
                w.received += 1
                self._take_one(w, word & 7, blob)
                self._progress(w, -1.0, _now())
            number += 1
        w.gone = True
        began = bool(w.messages) and w.began_head()
        code, pid = w.process.exitcode, w.process.pid
        with contextlib.suppress(KeyError, ValueError):
            engine.selector.unregister(w.sentinel)
        if not w.eof:
            engine.selector.unregister(w.link.waitable)
        w.close()
        self.workers.remove(w)
        self.missing += 1
        if not w.ready:
            # Killed from outside: start another, within reason. Exited by itself: it will
            # again (the main module fails to import, say).
            for msg in w.messages:
                engine.requeue(msg.jobs)
            w.messages.clear()  # a message refers to its worker: let both go now
            self.boot_deaths += 1
            # An exit code is the process's own, but on Windows os.kill(pid, n) ends it with n.
            by_itself = code is not None and (code == 1 or (code >= 0 and os.name == "posix"))
            if by_itself or self.boot_deaths > _BOOT_DEATHS:
                cure = "" if self.fork else _GUARD_CURE
                raise BrokenProcessPool(f"a worker process {_exit_reason(code)} before it was ready; "
                                        f"see its output above.{cure}")
            return
        if began and w.messages[0].owed and not w.killed:
            msg = w.messages[0]
            task = msg.head_task()
            died = f"the worker process (pid {pid}) running {_short(task)} {_exit_reason(code)}"
            # Its text reads as in mplite 1.x; exception mode raises the richer class.
            engine.fail_head(msg, _Failure(_describe(ChildProcessError(died))[0], exc=WorkerDiedError(died)))
        # The rest never began; after a timeout, the task after the one stopped may have just
        # begun, as the stopped one finished: it runs again.
        for msg in w.messages:
            engine.requeue(msg.jobs)
        w.messages.clear()

    def running(self):
        """The messages whose first owed task may be running (for timeouts): not on a worker
        still booting, nor one stopped already."""
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
    """Start a worker that runs the main script again (spawn, forkserver) only if there is one:
    `python -` sets __main__.__file__ to '<stdin>', which a worker can't run (its functions
    travel by value anyway); and Python deletes it once the script is done, while an executor
    may still start workers to finish its work."""
    main = vars(sys.modules["__main__"])
    had, want = main.get("__file__", _MISSING), _main_file()
    if fork or had == want or (had is _MISSING and want is None):
        yield
        return
    if want is None:
        del main["__file__"]
    else:
        main["__file__"] = want
    try:
        yield
    finally:
        if had is _MISSING:
            main.pop("__file__", None)
        else:
            main["__file__"] = had


def _close_lifelines():
    """In a fork of the parent (its own, or a worker), let go of the parent's end of each
    lifeline: the workers see the parent's death only once every copy of that end is closed."""
    for engine in list(_live_engines):
        end = getattr(engine.backend, "lifeline_end", None)
        if end is not None and not end.closed:
            end.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lifelines)


def _wait_for_exit(processes, seconds):
    """Wait up to `seconds` for the processes to end; return those still alive."""
    deadline = _now() + seconds
    alive = [p for p in processes if p.exitcode is None]
    while alive:
        left = deadline - _now()
        if left <= 0:
            break
        wait([p.sentinel for p in alive], left)
        alive = [p for p in alive if p.exitcode is None]
    return alive


# -- the worker process ---------------------------------------------------------------------------

def _worker_main(conn, journal, lifeline, lifeline_end, init):
    """The loop each worker process runs: read a message of tasks, run them, answer each.

    init: worker_init as (f, args, kwargs), pickled by mplite where the worker is not forked
    (multiprocessing would pickle it by name only: see _pickle), or None.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which then stops us
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked since its birth: see _spawn
    lifeline_end.close()  # a forked worker inherits the parent's end: ours would hide its death
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
        _serve_messages(link, out)
    except OSError:  # the parent is gone: nobody to tell
        pass


def _serve_messages(link, out):
    for message in _FrameReader().frames(link):
        if not message:  # asked to exit
            return
        out.note_received()
        try:
            timed, runs = pickle.loads(message)
        except BaseException:
            out.send_alone(_UNREADABLE, b"")
            continue
        del message
        if timed:  # a timeout counts from here: unpickling may have imported modules for a while
            out.link.write([_frame_head(_STARTED, out.messages, 0)])
        out.run(_calls(runs), sum(len(run[2]) for run in runs), timed)
        del runs  # the tasks' arguments are let go now, not when the next message comes


# A message holds runs of tasks, each (f, star, items): f(*item) or f(item) for each item, or
# where f is None, items of (f, args, kwargs), or of bytes: a task pickled on its own. A map()
# or a call of one function travels as its arguments only, and the worker rebuilds each call
# in C, with no Python code per task.

def _calls(runs):
    """(f, args, kwargs) for each task of a message's runs, made as the worker goes."""
    return itertools.chain.from_iterable(map(_run_calls, runs))


def _run_calls(run):
    f, star, items = run
    if f is None:
        return items
    if f.__class__ is bytes:  # sent by value to an executor's worker: see _remote_run
        f = pickle.loads(f)
    return zip(repeat(f), items if star else zip(items), repeat(_NO_KWARGS))


class _Outbox:
    """A worker's answers on their way to the parent, kept in its journal until the pipe has
    them. A flush sends them in one write (an _ENTRIES frame is the journal's layout), then
    empties the journal."""

    def __init__(self, link, journal):
        mem = memoryview(journal.buffer)
        self.link = link
        self.number = 0    # of the journal's first answer: answers sent so far
        self.messages = 0  # read from the parent
        self.head = mem[:_JOURNAL_HEAD.size]
        self.words = mem[_JOURNAL_HEAD.size:_JOURNAL_DATA]
        self.data = mem[_JOURNAL_DATA:]

    def run(self, calls, n, each):
        """Run a message's n tasks, journal each answer, send them all (and some on the way)."""
        words, data, room = self.words.cast("Q"), self.data, len(self.data)
        dumps, scalar, scalars = pickle.dumps, marshal.dumps, _SCALARS  # locals: this is the hot loop
        count = end = 0
        values = []  # the _SCALAR results in the journal: all of its answers, if as many
        started = flushed = _now()
        for entry in calls:
            kind = _DONE
            try:
                f, args, kwargs = pickle.loads(entry) if entry.__class__ is bytes else entry
                value = f(*args, **kwargs)
            except BaseException as exc:  # SystemExit too: it ends the task, not the worker
                kind, blob = _FAILED, dumps(_describe(exc), -1)
            else:
                try:
                    if value.__class__ in scalars:
                        kind, blob = _SCALAR, scalar(value)
                    else:
                        blob = dumps(value, -1)
                except BaseException as exc:  # the error pickling raised is the task's
                    note = (f"The above was raised while pickling the result of {_short(Task(f, *args, **kwargs))}, "
                            f"a {type(value).__name__}, to send it back: it can't be pickled.")
                    kind, blob = _FAILED, dumps(_describe(exc, note), -1)
            stop = end + len(blob)
            if stop > room or count == _JOURNAL_ENTRIES:  # full: send what it holds first
                self.flush(count, end, values)
                count, end, stop, values = 0, 0, len(blob), []
            if stop > room:  # too large for the journal: it goes on its own, straight away
                self.send_alone(kind, blob)
            else:
                data[end:stop] = blob
                words[count] = stop << 3 | kind  # written last: only now does the answer count
                end = stop
                count += 1
                if kind == _SCALAR:
                    values.append(value)
            # With a timeout the parent must see each task end: it times the next from there.
            if each or (count & 7 == 0 and _now() - flushed > _FLUSH_SECONDS):
                self.flush(count, end, values)
                count = end = 0
                values = []
                flushed = _now()
        self.flush(count, end, values, (_now() - started) / n)  # this sizes later batches

    def note_received(self):
        """Tell the parent, should this process die, that the tasks of the message just read began."""
        self.messages += 1
        _JOURNAL_HEAD.pack_into(self.head, 0, self.number, self.messages)

    def flush(self, count, end, values, spent=-1.0):
        """Send the journal's answers: as one pickled list where they are all _SCALAR results."""
        if count or spent >= 0:
            if count and len(values) == count:
                listed = pickle.dumps(values, -1)
                self.link.write([_frame_head(_LISTED, count, len(listed), spent), listed])
            else:
                kinds = self.words[:8 * count:8].tobytes().translate(_KIND_OF_BYTE)  # each word's low byte
                form = _ENTRIES if kinds.strip(bytes([_DONE])) else _PICKLED
                self.link.write([_frame_head(form, count, 8 * count + end, spent),
                                 self.words[:8 * count], self.data[:end]])
            self.words[:8 * count] = bytes(8 * count)  # empty the journal first, then renumber it
            self._sent(count)

    def send_alone(self, kind, blob):
        """One answer, straight down the pipe: too large for the journal, or not a task's."""
        self.link.write([_frame_head(_PICKLED if kind == _DONE else _ENTRIES, 1, 8 + len(blob)),
                         _LENGTH.pack(len(blob) << 3 | kind), blob])
        self._sent(1)

    def _sent(self, count):
        self.number += count
        _JOURNAL_HEAD.pack_into(self.head, 0, self.number, self.messages)


def _exit_when_closed(lifeline):
    """Worker thread: the parent holds the only other end, so EOF here means it has died."""
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        os._exit(1)


class _FrameReader:
    """Whole frames out of what a pipe delivers, at either end: each read takes what has
    arrived (as much as fits), and a frame may come in several reads, or several in one."""

    def __init__(self):
        self.rest = b""  # the start of a frame, read without its end
        self.buffer = memoryview(bytearray(_READ_SIZE))  # reused: a fresh 256 KiB each read
        # would be mapped and unmapped by malloc every time, in a thread's arena
        self.big = None  # a large frame being read straight into its own buffer
        self.have = 0    # how much of it has arrived

    def read(self, link):
        """The frames completed by one read (which blocks only if nothing has come); EOFError at the end."""
        if self.big is not None:
            got = link.read_into(memoryview(self.big)[self.have:])
            if not got:
                raise EOFError
            self.have += got
            if self.have < len(self.big):
                return ()
            frame, self.big = self.big, None
            return (frame,)
        got = link.read_into(self.buffer)
        if not got:
            raise EOFError
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

    def frames(self, link):
        """The frames, one by one, as they come (the worker's loop); the end at EOF."""
        with contextlib.suppress(EOFError, OSError):
            while True:
                yield from self.read(link)


# -- the wire: the one description of its bytes -----------------------------------------------------
#
# A pipe carries frames both ways: a length (_LENGTH, u64) and that many bytes.
#   parent -> worker: a pickled message, (timed, runs) (see _calls); an empty frame asks the
#       worker to exit.
#   worker -> parent: answers. _HEADER: count (u32), form (u8), spent (f64: seconds per task of
#       the message the frame ends, else -1); then by form:
#       _ENTRIES  count entry words (u64: end << 3 | kind, end counted from the first entry's
#                 bytes), then the entries' bytes, back to back
#       _PICKLED  the same, where every entry is a _DONE result: unpickled with no Python loop
#       _LISTED   one pickled list of count results, every one a _SCALAR (one unpickle)
#       _STARTED  nothing more: the worker began its message number `count` (sent only for a
#                 message with a timeout, which counts from there)
#   The kinds of entry: _DONE, a pickled result; _SCALAR, a marshalled one (half the cost, for
#   _SCALARS); _FAILED, the pickled (text, exception, frames) of _describe; _READY; _INIT_FAILED,
#   the pickled text of the error; _UNREADABLE, the message could not be unpickled.
# A worker's journal, in shared memory: _JOURNAL_HEAD (the number of its first entry, the
# messages the worker has read), room for _JOURNAL_ENTRIES entry words (0: not written yet),
# then the entries' bytes. The same words and bytes as an _ENTRIES frame: a dead worker's
# unsent answers are read by _entries as a frame's are.

_LENGTH = struct.Struct("<Q")
_HEADER = struct.Struct("<IBd")
_ENTRIES, _PICKLED, _LISTED, _STARTED = range(4)
_DONE, _FAILED, _READY, _INIT_FAILED, _UNREADABLE, _SCALAR = range(6)
_ANSWER_KINDS = (_DONE, _SCALAR, _FAILED)
# Only immutable results are listed at flush time: another could have changed since its task.
_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})
_KIND_OF_BYTE = bytes(b & 7 for b in range(256))  # an entry's kind, from its word's low byte
_NO_KWARGS = {}
_JOURNAL_HEAD = struct.Struct("<QQ")
_JOURNAL_ENTRIES = 4096
_JOURNAL_DATA = _JOURNAL_HEAD.size + 8 * _JOURNAL_ENTRIES
_JOURNAL_SIZE = _JOURNAL_DATA + (1 << 20)
_FLUSH_SECONDS = 0.02  # a long message's answers are sent this often (the clock is read every 8 tasks)


def _frame_head(form, count, size, spent=-1.0):
    """A worker's frame, up to its body of `size` bytes."""
    return _LENGTH.pack(_HEADER.size + size) + _HEADER.pack(count, form, spent)


def _entries(buf, words_at, count, data_at):
    """(words, blobs) of `count` entries: their words at words_at, their bytes from data_at."""
    words = struct.unpack_from(f"<{count}Q", buf, words_at)
    stops = list(map(add, map(rshift, words, repeat(3)), repeat(data_at)))  # no Python loop
    view = memoryview(buf)
    return words, list(map(view.__getitem__, map(slice, [data_at] + stops[:-1], stops)))


def _journal_answers(journal):
    """(the number of its first, (words, blobs)) of the answers a dead worker's journal holds."""
    mem = memoryview(journal.buffer)
    words = mem[_JOURNAL_HEAD.size:_JOURNAL_DATA].cast("Q").tolist()
    count = words.index(0) if 0 in words else len(words)
    return _JOURNAL_HEAD.unpack_from(mem)[0], _entries(mem, _JOURNAL_HEAD.size, count, _JOURNAL_DATA)


# ---------------------------------------------------------------------------------------------
# Workers elsewhere: TaskManager(executor=...) on any concurrent.futures executor
#
# The same engine and owners, submitting to an executor (dask's client.get_executor(), say)
# instead of worker processes. The turn owns every record (`submitted`: which submission holds
# which tasks); a future's callback only hands its outcome back as a command. What differs:
#   - A submission, one _run_remote(token, runs) call, costs milliseconds (dask: 3-6 ms): tasks
#     go in batches of about _REMOTE_BATCH_SECONDS of measured work, alone while unmeasured or
#     long. Arguments are positional (dask keeps `key`, `pure`); the token makes each submission
#     unique (dask runs identical "pure" calls once).
#   - Outcomes are made where tasks ran: a result, or the traceback as text and the exception
#     pickled, so they survive any serializer.
#   - A submission the executor fails (a dead worker: KilledWorker, BrokenProcessPool) turns
#     its tasks into suspects, each rerun alone with nothing else of ours in flight, and blamed
#     only if it fails so: a task may run twice (dask too reruns a dead worker's work).
#   - A timeout can't stop a remote task: it gets its TimeoutError at the deadline, and its
#     submission stays in flight until the executor is done. A timed task goes alone, so none
#     times out for a stuck one ahead.
#   - A probe (standard-library bytes that unpickle as a module's name) checks that the workers
#     can import a function's module, and mplite, before its first submission: dask hangs on a
#     task it can't unpickle; this fails clearly.
#   - A future is let go once its outcome is in: dask recomputes results it holds when their
#     worker dies.
#
# To delete this feature: remove this section, the `executor` argument of TaskManager (and
# _executor_slots), and the bytes case of _run_calls.
# ---------------------------------------------------------------------------------------------

_REMOTE_BATCH_SECONDS = 0.3  # dask's overhead on W2 (40 x 50 ms): 15 % at 0.1 s, 3 % at 0.3 s
_REMOTE_MAX_BATCH = 100_000
_submissions = itertools.count(1)
_NONCE = os.urandom(8).hex()  # with the pid and a count: unique anywhere


def _run_remote(token, runs):
    """A submission's tasks, run where the executor runs it: (results, {index: failure}, seconds per task)."""
    started = _now()
    results, failures = [], {}
    for i, entry in enumerate(_calls(runs)):
        try:
            f, args, kwargs = pickle.loads(entry) if entry.__class__ is bytes else entry
            results.append(f(*args, **kwargs))
        except BaseException as exc:  # SystemExit too: it ends the task, not the worker
            results.append(None)
            failures[i] = _describe(exc)
    return results, failures, (_now() - started) / max(1, len(results))


def _import_probe(name):
    """Bytes that unpickle, anywhere, as `name` once that module is imported."""
    class Module:
        def __reduce__(self):
            return importlib.import_module, (name,)

    class Name:
        def __reduce__(self):
            return getattr, (Module(), "__name__")

    return pickle.dumps(Name(), 2)


class _ExecutorBackend:
    """The engine's backend on a foreign executor (see above). size: how many submissions may
    run at once (twice that are in flight, so that none waits for the next)."""
    forked_main = None
    timeout_note = "it may still be running on the executor, which can't stop it"

    def __init__(self, executor):
        self.executor = executor
        self.submitted = {}  # future -> _Message: the submissions in flight
        self.suspects = deque()  # one-task jobs of submissions the executor failed
        self.probes = {}  # module -> True (importable there), None (probing), ImportError

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
            msg = engine.take_batch(_REMOTE_BATCH_SECONDS, _REMOTE_MAX_BATCH, timed_alone=True)
            if msg is None:
                return
            try:
                states = [self._probe(m) for m in self._modules(msg.head_task().func)]
            except BrokenProcessPool:
                engine.requeue(msg.jobs)  # its owners are told, with the rest, as the pool stops
                raise
            error = next((s for s in states if isinstance(s, ImportError)), None)
            if error is not None:
                for job in msg.jobs:
                    engine.refuse(job.owner, job.start, job.stop, error)
            elif None in states:  # probing: the tasks wait, in order
                return engine.requeue(msg.jobs)
            else:
                self._submit(msg)

    def _submit(self, msg):
        engine = self.engine
        try:
            runs = [self._remote_run(job) for job in msg.jobs]
        except _TASK_ERRORS as exc:  # a task whose arguments can't be pickled by value
            if not msg.alone:
                return self._failed(msg, exc)  # find which, one by one
            job = msg.jobs[0]
            return engine.refuse(job.owner, job.start, job.stop, UnpicklableTaskError(
                f"{_short(msg.head_task())} can't be sent to the executor: it can't be pickled: {exc}"))
        token = (_NONCE, os.getpid(), next(_submissions))
        try:
            future = self.executor.submit(_run_remote, token, runs)
        except (RuntimeError, futures.BrokenExecutor) as exc:  # shut down, or broken for good
            engine.requeue(msg.jobs)
            raise BrokenProcessPool(f"the executor refused work: {exc!r}") from exc
        except Exception as exc:  # it can't take these (it pickles them now, say)
            return self._failed(msg, exc)
        msg.where, msg.sent_at = future, _now()
        msg.began = msg.sent_at
        self.submitted[future] = msg
        future.add_done_callback(functools.partial(self._later, self._landed))

    def _remote_run(self, job):
        """A job's run for _run_remote: functions the executor's workers can't import by name
        (lambdas, notebook functions) travel pickled by mplite, by value."""
        f, star, items = job.owner.run(job.start, job.stop)
        if f is None:
            return None, False, [_pickle(e) if _by_value(e[0]) else e for e in items]
        return (_pickle(f) if _by_value(f) else f), star, items

    # -- the import probe ------------------------------------------------------------------------

    def _modules(self, f):
        """The modules the executor's workers must import to run f: this one, and f's (unless
        it travels by value with a namespace of its own)."""
        name = getattr(f, "__module__", None)
        module = sys.modules.get(name)
        ok = name not in ("__main__", "builtins") and module and _importable(name, module)
        return {__name__, name} if ok else {__name__}

    def _probe(self, name):
        if name in self.probes:
            return self.probes[name]
        self.probes[name] = None
        try:
            future = self.executor.submit(pickle.loads, _import_probe(name))
        except (RuntimeError, futures.BrokenExecutor) as exc:  # shut down, or broken for good
            raise BrokenProcessPool(f"the executor refused work: {exc!r}") from exc
        except Exception:  # it won't take the probe: the tasks will say what they meet
            self.probes[name] = True
            return True
        future.add_done_callback(functools.partial(self._later, self._probed, name))
        return None

    def _probed(self, name, future):
        error = None if future.cancelled() else future.exception()
        self.probes[name] = True  # imported, or another error, which the tasks will meet
        if isinstance(error, ImportError):
            file = getattr(sys.modules.get(name), "__file__", None) or "<its file>"
            self.probes[name] = ImportError(
                f"the executor's workers can't import the module {name!r}: {error}. Make it importable "
                f"there: install it on every worker, or with dask, client.upload_file({file!r})", name=name)

    # -- outcomes --------------------------------------------------------------------------------

    def _later(self, command, *args):
        """From an executor's thread: have the turn run command(*args)."""
        with contextlib.suppress(RuntimeError):  # the pool has stopped: nobody waits for it
            self.engine.put(functools.partial(command, *args))

    def _landed(self, future):
        msg = self.submitted.pop(future, None)
        if msg is None or not msg.owed:
            return  # stopped meanwhile, or past its deadline: its task has its error
        error = futures.CancelledError() if future.cancelled() else future.exception()
        if error is None:
            outcome = future.result()
            del future
            try:
                results, failures, spent = outcome
                if len(results) != msg.owed:
                    raise ValueError(f"{len(results)} results for {msg.owed} tasks")
            except (TypeError, ValueError) as exc:  # an executor that calls its own way
                error = TypeError(f"the executor returned {reprlib.repr(outcome)} for a batch: {exc}")
            else:
                if msg.key is not None:
                    self.engine.measured(msg.key, spent)
                start = 0
                for i in sorted(failures):
                    self.engine.deliver(msg, results[start:i])
                    self.engine.fail_head(msg, _Failure(*failures[i]))
                    start = i + 1
                return self.engine.deliver(msg, results[start:])
        self._failed(msg, error)

    def _failed(self, msg, error):
        """The executor failed a submission: blame its task if it ran alone, else find which."""
        if msg.alone:
            died = (f"{_short(msg.head_task())} failed on the executor, which gave: "
                    f"{type(error).__name__}: {_clip(str(error), 400)}")
            failure = _Failure.of(WorkerDiedError(died))
            failure.exc.__cause__ = error  # the executor's own error
            self.engine.fail_head(msg, failure)
        else:
            for job in msg.jobs:  # run each alone, to find which one it was
                self.suspects.extend(_Job(job.owner, i, i + 1) for i in range(job.start, job.stop))

    # -- the engine's questions, and the end -----------------------------------------------------

    def running(self):
        """The submissions in flight whose tasks still wait for their outcome."""
        return [msg for msg in self.submitted.values() if msg.owed]

    def abandon(self, msg):
        pass  # the executor can't stop it: its outcome, when it comes, is ignored

    def busy(self):
        return bool(self.suspects or self.running())

    def held_jobs(self):
        return list(self.suspects) + [job for msg in self.running() for job in msg.jobs]

    def forget(self, owner):
        self.suspects = deque(j for j in self.suspects if j.owner is not owner)

    def stop(self, grace):
        """The executor is the user's, and goes on: only this manager's submissions are cancelled."""
        for future in self.submitted:
            future.cancel()
        self.submitted.clear()


def _by_value(f):
    """Must f travel by value to an executor's workers? Only a function they can't import."""
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
# pickle sends a function by name: the worker imports its module and looks it up. That fails for
# a lambda, a nested function, and anything typed into a notebook, a REPL, `python -c` or
# `python -` (the workers can't import that __main__). Such a function travels by value: its
# code (marshal: parent and workers run the same interpreter), closure cells, defaults and the
# globals its code really uses. Functions of one namespace share one globals dict in each
# worker, as a module's share the module. One the workers can import still goes by name.
#
# To delete this feature: remove this section, and pickle with ForkingPickler.dumps where
# _pickle is called (a message, a task, worker_init); lambdas, closures and notebook functions
# are then refused, with the error pickle gives.
# ---------------------------------------------------------------------------------------------

_CURE = ("move it into a .py module next to your notebook or script and import it from there, "
         "or use context='fork' where available")
# The opcodes that name a global. Attribute names (x.tm) are in co_names too, under LOAD_ATTR
# and STORE_ATTR: they must not drag a global of the same name along.
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME",
                         "LOAD_FROM_DICT_OR_GLOBALS"})
_WRITE_OPS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})
_MISSING = object()
_is_file = functools.lru_cache(maxsize=8)(os.path.isfile)  # a stat per script, not per batch
_main_script = {}  # see _main_file
_code_info_cache = {}  # see _code_info
_kept_globals = {}  # id -> globals dict, kept so that no other dict takes its id


def _pickle(obj, forked_main=None, sent=None):
    """obj pickled for a worker: by name where it can import it (multiprocessing's pickler, the
    fast path), else by value: when that fails (a lambda), or always where __main__ is no file (a
    notebook: names mislead). forked_main: a fork pool's {name: class} of the __main__ its workers
    inherit: those go by name. sent: see _ByValuePickler. Raises PicklingError saying why."""
    if _importable("__main__", sys.modules["__main__"]):
        with contextlib.suppress(*_TASK_ERRORS):
            _ByNamePickler(out := io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(obj)
            return out.getvalue()
    pickler = _ByValuePickler(out := io.BytesIO(), forked_main, sent)
    try:
        pickler.dump(obj)
    except _TASK_ERRORS as exc:
        why = _culprit(pickler.by_value, forked_main)
        if why is None:
            raise
        raise pickle.PicklingError(why) from exc
    if sent is not None:
        sent.update(pickler.fresh)
    return out.getvalue()


class _ByNamePickler(ForkingPickler):
    """multiprocessing's pickler; it gives up (for the by-value one) on a function defined under
    the main script's `if __name__ == "__main__":`, which a spawned worker skips."""

    def reducer_override(self, obj):  # not called for ints, strs, lists, dicts...
        if _under_main_guard(obj):
            raise pickle.PicklingError
        return NotImplemented


def _under_main_guard(obj):
    if type(obj) is not types.FunctionType or obj.__module__ != "__main__":
        return False
    line, path = obj.__code__.co_firstlineno, _main_file()
    if line < _first_top_level_if(path):  # the usual case: no need to parse the script
        return False
    return any(start <= line <= end for start, end in _main_guards(path))


@functools.lru_cache(maxsize=4)
def _first_top_level_if(path):
    """The line of the main script's first top-level `if` (inf: none, no script, or none to read):
    a quick scan, as parsing a long script takes tens of milliseconds."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        with open(path, "rb") as source:
            for number, text in enumerate(source, 1):
                if text.startswith((b"if ", b"if(", b"if\t")):
                    return number
    return float("inf")


@functools.lru_cache(maxsize=4)
def _main_guards(path):
    """(first, last) line of each top-level `if __name__ == ...:` block of the main script."""
    import ast  # not at the top: workers (which import mplite) never need it
    with contextlib.suppress(OSError, TypeError, ValueError, SyntaxError):
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
        return tuple((node.lineno, node.end_lineno) for node in tree.body
                     if isinstance(node, ast.If) and "__name__" in ast.dump(node.test))
    return ()


def _importable(name, module):
    """Will a worker import this module by name? spawn and forkserver workers run __main__
    again from its file, but not a notebook's, a REPL's, `-c`'s, stdin's ('<stdin>' is no
    file) or a package's (`python -m pkg`)."""
    spec = getattr(module, "__spec__", None)
    if name != "__main__":
        return spec is not None or hasattr(module, "__file__")  # else made at run time
    if spec is not None:
        return not spec.name.endswith("__main__")
    path = _main_file()
    return path is not None and os.path.basename(path) != "ipython"


def _main_file():
    """The main script's path, if a file. Kept in _main_script (id of a __main__ -> (it, its file)):
    Python deletes __main__.__file__ when the script ends, and an executor may send work after."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if path is not None:
        _main_script[id(main)] = (main, path if _is_file(path) else None)
    return _main_script.get(id(main), (None, None))[1]


def _by_name(obj):
    """Can a worker find this function or class by its module and qualified name? Not cached:
    a notebook cell run again makes a new function under the old name, which must then go by value."""
    if "<" in obj.__qualname__:  # <lambda>, <locals>: no attribute path leads there
        return False
    module = sys.modules.get(obj.__module__)
    if module is None or not _importable(obj.__module__, module):
        return False
    for part in obj.__qualname__.split("."):
        module = getattr(module, part, None)
    return module is obj and not _under_main_guard(obj)


def _stuck_class(cls):
    """A class no worker can import: defined in a function, or in a file-less __main__."""
    return (cls.__module__ == "__main__" or "<locals>" in cls.__qualname__) and not _by_name(cls)


def _code_info(code):
    """(weakref to code, marshalled code, names its bytecode uses as globals, those it writes,
    co_names), nested code included; once per code object (~100 us; lambdas of a loop share it)."""
    import dis  # as ast in _main_guards
    info = _code_info_cache.get(id(code))
    if info is None or info[0]() is not code:
        names, writes, attrs, todo = set(), set(), set(), [code]
        while todo:
            c = todo.pop()
            attrs.update(c.co_names)
            found = [i for i in dis.get_instructions(c) if i.opname in _GLOBAL_OPS]
            names.update(i.argval for i in found)
            writes.update(i.argval for i in found if i.opname in _WRITE_OPS)
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
    """Submodules the code reaches as attributes (`xml.dom.minidom.parseString` after
    `import xml.dom.minidom`): a worker importing the package alone may not load them."""
    found, todo = [], [module]
    while todo:
        prefix = todo.pop().__name__ + "."
        for name in names:
            sub = sys.modules.get(prefix + name)
            if sub is not None and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


class _ByValuePickler(ForkingPickler):
    """multiprocessing's pickler (its reducers kept), sending by value what can't go by name.
    sent: per worker, {(namespace, name): value} of the globals it holds, not sent again; the
    engine empties it when new work arrives, so changed globals reach the workers. fresh: what
    this message sends, for `sent` once done. by_value: the functions sent so, for _culprit."""

    def __init__(self, file, forked_main=None, sent=None):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.forked_main = forked_main
        self.sent = sent
        self.fresh = {}
        self.by_value = []

    def reducer_override(self, obj):  # once per object (pickle's memo), not for int, str...
        if type(obj) is types.FunctionType:
            return NotImplemented if _by_name(obj) else self._reduce_function(obj)
        if isinstance(obj, type):
            forked = self.forked_main
            if not _stuck_class(obj) or forked is not None and forked.get(obj.__qualname__) is obj:
                return NotImplemented  # importable, or the forked workers have it
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
        _kept_globals[id(g)] = g
        namespace = (f.__module__, os.getpid(), id(g), shared)  # see _namespace
        # A name not in g: a builtin, or not defined yet.
        values = {n: g[n] for n in names if n in g and n != "__builtins__"}
        modules = [sub for v in values.values() if isinstance(v, types.ModuleType)
                   for sub in _submodules(v, used)]
        if self.sent is not None:
            values = {n: v for n, v in values.items() if self.sent.get((namespace, n), _MISSING) is not v}
            self.fresh.update({(namespace, n): v for n, v in values.items()})
        attrs = {"__qualname__": f.__qualname__}
        for attr in ("__defaults__", "__kwdefaults__", "__doc__", "__dict__"):
            if getattr(f, attr):  # None or empty: the rebuilt function has that already
                attrs[attr] = getattr(f, attr)
        if f.__annotations__:  # documentation: a class that can't travel goes as its name
            attrs["__annotations__"] = {k: v.__qualname__ if isinstance(v, type) and _stuck_class(v) else v
                                        for k, v in f.__annotations__.items()}
        self.by_value.append(f)
        # With a state setter, pickle memoizes the bare function before it pickles the state:
        # so a function that reaches itself (recursion, f -> g -> f, its own closure) works.
        state = (namespace, values, writes, _cells(f), attrs, modules)
        return _function_skeleton, (code, f.__name__, namespace), state, None, None, _function_setstate


def _culprit(functions, forked_main):
    """After a failure: which value of which by-value function can't be pickled, in words."""
    for f in reversed(functions):  # the innermost first: it was being pickled
        g, free = f.__globals__, f.__code__.co_freevars
        parts = [(f"global {n!r}", g[n]) for n in _code_info(f.__code__)[2] if n in g]
        parts += [(f"closure variable {free[i]!r}", v) for i, v in _cells(f).items()]
        parts += [("default value", v) for v in f.__defaults__ or ()]
        parts += [(f"default for {k!r}", v) for k, v in (f.__kwdefaults__ or {}).items()]
        for what, value in parts:
            if type(value) is types.FunctionType and not _by_name(value):
                continue  # a by-value function: looked at on its own
            try:
                _ByValuePickler(io.BytesIO(), forked_main).dump(value)
            except _TASK_ERRORS as exc:
                cure = "" if _CURE in str(exc) else (
                    "; define the function at the top level of a .py module and import it, or "
                    "create that value in the worker (in worker_init, say)")
                return (f"function {f.__module__}.{f.__qualname__} can't be sent to a worker process "
                        f"by value: its {what}, a {type(value).__qualname__}, can't be pickled: {exc}{cure}")


# The worker's side: pickle.loads finds _function_skeleton and _function_setstate by name.

_namespaces = {}  # (module, parent pid, id of its globals there, shared) -> globals dict
_assigned = {}  # id of a globals dict here -> the names its functions assign


def _namespace(key):
    """The one globals dict of a source namespace in this worker: an importable module's own (a
    script's __main__ too), which its functions sent by name use; for a notebook's functions, one
    of their own (as a module's share the module), not the worker's __main__: names would clash."""
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
    key, values, writes, cells, attrs, _ = state  # _: submodules, imported by unpickling
    namespace = _namespace(key)
    # A module this worker imported: its values win, as for its functions sent by name. A
    # notebook: a name its functions assign (`global model` in a worker_init) is the worker's once
    # there, kept from the parent's stale copy (often `model = None`); others take the newest.
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
# Pipes carry a stream of frames both ways (see the wire); a link moves those bytes over one
# end. On POSIX, _FdLink uses the socket's descriptor itself (one system call a message, no
# copies) and the engine sleeps in epoll on pipes, pidfds and its wake-up pipe. The portable
# path (Windows, or MPLITE_PORTABLE=1: CI runs the suite both ways on Linux) uses only what
# multiprocessing documents and tests on Windows:
#   - _ConnLink: a Connection's send_bytes and recv_bytes; each write is one message.
#   - _WaitSelector: multiprocessing.connection.wait(), which takes at most 63 handles: the
#     wake-up, a pipe per worker and a starting worker's sentinel (see
#     _Processes._start_missing); so at most 61 workers on Windows.
#   - _PortableWakeUp: a multiprocessing Pipe, not a socket or an os.pipe.
#   - A worker's death shows on its sentinel until it is ready, then on its pipe: a Windows
#     parent holds a copy of the child's end until the child, done importing the main script,
#     takes it over, so a worker that dies before (an unguarded script, say) closes no pipe.
#     The portable path keeps that copy until the worker is ready on every system, so that
#     Linux shows what Windows does.
#   - Only the engine thread runs the turn: wait() can't be shared between threads.
#
# To delete the portable path (mplite then runs on POSIX only): remove this section, use
# _FdLink, selectors.DefaultSelector and _PipeWakeUp in its place, and the _PORTABLE cases of
# _Engine._hold_turn, _exit_fd and _Processes.
# ---------------------------------------------------------------------------------------------

class _FdLink:
    """One end of a socket-pair Pipe, read and written through its descriptor (POSIX)."""
    buffered = False  # never: a read takes only what the socket has

    def __init__(self, conn):
        self.fd = self.waitable = conn.fileno()

    def write(self, parts):
        """Write byte buffers as one message: one system call, unless the message is large."""
        written = os.writev(self.fd, parts)
        for part in parts:
            if written < len(part):
                view = memoryview(part)[written:]
                while view:
                    view = view[os.write(self.fd, view):]
            written = max(0, written - len(part))

    def read_into(self, view):
        """Read what has arrived, as much as fits (blocks until something has); 0 at EOF."""
        return os.readv(self.fd, [view])

    def room(self):
        """Bytes the socket takes without blocking the writer (macOS's buffers are small)."""
        with socket.socket(fileno=os.dup(self.fd)) as sock:
            return min(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                       sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


class _ConnLink:
    """One end of a Pipe, through its Connection's messages only: runs on every system."""

    def __init__(self, conn):
        self.conn = self.waitable = conn
        self.rest = memoryview(b"")  # read from the pipe, not handed on yet

    @property
    def buffered(self):
        return bool(self.rest)

    def write(self, parts):
        self.conn.send_bytes(b"".join(parts))

    def read_into(self, view):
        if not self.rest:
            try:
                self.rest = memoryview(self.conn.recv_bytes())
            except EOFError:
                return 0
        n = min(len(view), len(self.rest))
        view[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n

    def room(self):
        return 8192  # a Windows named pipe's buffer, as multiprocessing makes it


class _WaitSelector:
    """What the engine uses of selectors' interface, over multiprocessing.connection.wait()."""

    def __init__(self):
        self.keys = {}

    def register(self, obj, events, data):
        self.keys[obj] = selectors.SelectorKey(obj, None, events, data)

    def unregister(self, obj):
        del self.keys[obj]

    def select(self, timeout=None):
        return [(self.keys[obj], selectors.EVENT_READ) for obj in wait(list(self.keys), timeout)]

    def close(self):
        self.keys.clear()


class _PortableWakeUp:
    """_PipeWakeUp (see there) over a multiprocessing Pipe, which wait() takes on every system."""

    def __init__(self):
        self.waitable, self.w = Pipe(duplex=False)
        self.rung = False

    def ring(self):
        if not self.rung:
            self.rung = True
            with contextlib.suppress(OSError):  # closed: the engine has stopped
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
_HANDLES = 63 if _PORTABLE else None  # what wait() takes at most
_MAX_WORKERS = 61 if _PORTABLE else None  # the wake-up and 61 pipes, a sentinel while starting


# ---------------------------------------------------------------------------------------------
# Errors: what a failed task's result is made of
# ---------------------------------------------------------------------------------------------

class _Failure:
    """A task's error, as the engine hands it to every owner: text, what str mode returns; blob,
    the pickled exception, if it survived a round trip; frames, (filename, lineno, name) of the
    worker's traceback; exc, the exception, for errors made in the parent; refused: the task
    could not even be sent."""
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
        """The exception to raise in the caller, with the worker's traceback; remote: that also
        as text in __cause__, as the standard library's executor gives it."""
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
    """(text, pickled exception or None, frames) of an exception: what travels back for it.
    note: a last paragraph for the text, saying what mplite was doing."""
    tb = exc.__traceback__
    tb = tb and tb.tb_next  # the first frame is ours, where the task was called
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
    """A real traceback whose frames point at the worker's files, lines and functions: for each,
    a `raise` compiled at that line of that file, its code named after the function, leaves a
    stand-in frame. It is padded to the real line's length, so that tracebacks underline nothing."""
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


def _mappable(f):
    """A Task of f alone, for _check_functions; or why f can't be mapped."""
    if not callable(f):
        raise TypeError(f"map needs a callable, not {f!r}")
    return Task(f)


def _one_function(tasks):
    """Do these Tasks all call the same function?"""
    return all(map(is_, repeat(tasks[0].func), map(_task_func, tasks)))


def _check_functions(tasks, forked_main):
    """Refuse a call whose function can't travel, even by value, before any task is sent (the
    usual case; tasks: one per distinct function). Arguments are checked as batches are pickled."""
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


# Windows: a process that crashed exits with the NTSTATUS of the crash, as an unsigned number.
_CRASHES = {0xC0000005: "an access violation", 0xC00000FD: "a stack overflow",
            0xC0000094: "an integer division by zero", 0xC000001D: "an illegal instruction",
            0xC0000409: "a stack buffer overrun (a failed check of the C runtime)",
            0xC0000374: "a corrupted heap", 0xC0000017: "running out of memory",
            0xC000013A: "Ctrl-C", 0x80000003: "a breakpoint"}


def _exit_reason(code):
    """How a worker process ended, in words, from its exit code on any system."""
    if code is None:  # reaped by multiprocessing itself, in another thread's active_children()
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


def _context(context):
    if context is None:
        context = "spawn"  # everywhere, as ProcessPoolExecutor's mp_context=None
    if isinstance(context, BaseContext):
        return context
    if not isinstance(context, str):
        raise TypeError(f"context must be a start method name or a multiprocessing context, not {context!r}")
    methods = get_all_start_methods()
    if context not in methods:
        raise ValueError(f"context must be one of {methods}, not {context!r}")
    return get_context(context)


def _usable_cpus():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(n, _MAX_WORKERS or n)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, not {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


def _seconds(value, name, zero_ok=False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {value!r}")
    if not (value >= 0 if zero_ok else value > 0) or value != value:
        raise ValueError(f"{name} must be {'0 or more' if zero_ok else 'more than 0'} seconds, not {value!r}")
    return value


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
    """A text bar on stderr in tqdm's default look: ` 45%|████▌     | 45/100 [00:02<00:03, 17.30tasks/s]`.
    On a terminal it redraws one line in place, at most 10 times a second. Elsewhere (a CI log,
    a file) it writes whole lines: at the start, then at growing intervals, and at the end."""

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
        self.drawn, self.drawn_n = now, self.n
        line = self.format(self.n, self.total, now - self.start)
        if self.tty:  # pad, to cover a longer line drawn before
            line, self.width = "\r" + line.ljust(self.width) + end, max(self.width, len(line))
        with contextlib.suppress(OSError, ValueError):  # a broken stream must not break the work
            self.file.write(line if self.tty else line + "\n")
            self.file.flush()

    def format(self, n, total, elapsed):
        frac = n / total if total else 1.0
        width, levels = 10, len(self.blocks) - 1
        full, part = divmod(int(frac * width * levels), levels)
        bar = (self.blocks[-1] * full + (self.blocks[part] if full < width else "")).ljust(width)
        if elapsed > 0 and n:
            rate = n / elapsed
            remaining = _clock((total - n) / rate)
            speed = f"{rate:5.2f}tasks/s" if rate >= 1 else f"{1 / rate:5.2f}s/tasks"
        else:
            remaining, speed = "?", "?tasks/s"
        return f"{frac * 100:3.0f}%|{bar}| {n}/{total} [{_clock(elapsed)}<{remaining}, {speed}]"


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


def _broken(*args, **kwargs):
    raise NotImplementedError("this task must fail!")


def _adder(a, b):
    return a + b


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
            tm.submit(Task(_adder, a, a + 1))
        sums = []
        while tm.open_tasks:
            sums.append(tm.take(timeout=None))
            if len(sums) == 2:
                tm.submit(Task(_adder, *sums))
                sums = []
        check("incremental work with submit/take adds 1..10 to 55", sums == [55], repr(sums))
        chain = TaskChain(Task(_adder, 20, 0), lambda prev_task, result: Task(_adder, result, 1))
        check("a task chain runs step after step", tm.execute([chain], progress=False) == [21])
    if all(checks):
        print(f"all {len(checks)} checks passed in {time.perf_counter() - start:.1f} s")
        return 0
    print(f"{checks.count(False)} of {len(checks)} checks FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(_self_test())
