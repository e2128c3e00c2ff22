"""mplite: a process pool in one file, whose tasks can't crash it.

    from mplite import TaskManager, Task

    def add(a, b=0):
        return a + b

    if __name__ == "__main__":
        with TaskManager() as tm:
            print(tm.execute([Task(add, i, b=1) for i in range(5)]))   # [1, 2, 3, 4, 5]
            tm.submit(Task(add, 40, 2))
            print(tm.take(timeout=None))                                # 42

``execute`` returns results in input order and shows a progress bar on stderr. A task
that raises, kills its worker or runs past its ``timeout`` gets an error as its result (its
traceback text, or with ``error_mode="exception"`` the exception raised in the caller); every
other task still runs, and a dead worker is replaced. ``python -m mplite`` runs a self-test.
Task functions may be lambdas, closures, or typed into a notebook: what the workers can't
import by name travels by value.

The pool works in the background: submitted tasks run while your program does something
else, and every method may be called from any number of threads at once. Code written for
``concurrent.futures`` or asyncio can use the same engine through ``ProcessPoolExecutor``:

    from mplite import ProcessPoolExecutor

    with ProcessPoolExecutor() as ex:
        future = ex.submit(add, 40, 2)          # a concurrent.futures.Future
        print(future.result())                  # 42
        print(list(ex.map(add, [1, 2], [3, 4])))  # [4, 6]

Standard library only, Python 3.8+, POSIX (Linux, macOS). MIT licence.
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
from multiprocessing import forkserver, get_context, get_all_start_methods, resource_tracker
from multiprocessing.connection import wait
from multiprocessing.context import BaseContext
from multiprocessing.heap import Arena
from multiprocessing.reduction import ForkingPickler
from operator import add, attrgetter, is_, rshift
from time import monotonic

__version__ = "2.2.0"
__all__ = ["Task", "TaskChain", "TaskManager", "ProcessPoolExecutor", "UnpicklableTaskError",
           "WorkerDiedError"]


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

    A Task is a functools.partial with mplite's names for its parts: ``f``, ``args``,
    ``kwargs`` and a unique ``id``. Being one, it is built in C, at half the cost of a class
    of our own: users build a Task per tiny task, often millions of them.
    """
    __slots__ = ("_id",)

    # The parts under the names mplite 1.x gave them (args is a partial's own), read-only.
    f = property(attrgetter("func"))
    kwargs = property(attrgetter("keywords"))

    @property
    def id(self):
        """A number unique to this task, drawn when first asked for (in 1.x: at creation)."""
        try:
            return self._id
        except AttributeError:
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

    __str__ = __repr__

    def __reduce__(self):  # a copy keeps the id and attributes; a subclass may take other arguments
        return type(self)._of, (self.func, self.args, self.keywords, self.id,
                                getattr(self, "__dict__", None) or None)

    def execute(self):
        """Run the task here, in this process; exceptions propagate. Handy for checking a task."""
        return self.func(*self.args, **self.keywords)


class TaskChain:
    """A task whose result decides what runs next, like a promise.

    ``next_task(prev_task, result)`` returns the next ``Task`` or ``TaskChain``, or None to end
    the chain with ``result``. In ``TaskManager.execute`` the chain's place in the results gets
    the result of its last task; ``next_task`` runs in the parent (on mplite's engine thread),
    and a chain waiting for its next step blocks nothing else.
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

    __str__ = __repr__

    def execute(self):
        """Run the whole chain here, in this process, and return the result of its last task."""
        chain = self
        while True:
            result = chain.task.execute()
            step = _next_step(chain, result)
            if step is None:
                return result
            if isinstance(step, Task):
                return step.execute()
            chain = step


class TaskManager:
    """A pool of worker processes that runs Tasks.

    cpu_count: number of workers (default: the CPUs this process may use).
    context: "spawn" (default), "fork", "forkserver" or a multiprocessing context.
    worker_init: a Task run once in every worker before it takes work.
    error_mode: "str" (a failed task's result is its traceback text) or "exception" (the
        task's exception is raised in the caller, with the worker's traceback).
    timeout: seconds a task may run, counted from its start in a worker; the worker of a task
        over its limit is stopped and replaced, and the task's result is a TimeoutError.
    max_tasks_per_child: replace each worker after this many tasks (for leaky code).
    executor: a concurrent.futures.Executor to run the tasks on instead of worker processes of
        mplite's own: dask's client.get_executor(), say (see the README, "Past one machine").
        cpu_count is then how many batches of tasks run at once (default: the executor's
        max_workers, or a dask cluster's threads). The executor is yours: stop() leaves it running.

    Use it as a context manager, or call start() and stop(). Once started, the pool works in
    the background, and every method may be called from any number of threads at once.
    """

    def __init__(self, cpu_count=None, context="spawn", worker_init=None, error_mode="str",
                 *, timeout=None, max_tasks_per_child=None, executor=None):
        self._ctx = _context(context)
        if executor is not None:
            if not isinstance(executor, futures.Executor):
                raise TypeError(f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}")
            if worker_init is not None or max_tasks_per_child is not None:
                raise ValueError("worker_init and max_tasks_per_child work on mplite's own workers only; "
                                 "an executor has its own (say, ProcessPoolExecutor's initializer)")
            if cpu_count is None:
                cpu_count = _executor_slots(executor)
        self._executor = executor
        self._cpu_count = _positive_int(_usable_cpus() if cpu_count is None else cpu_count, "cpu_count")
        if worker_init is not None and not isinstance(worker_init, Task):
            raise TypeError(f"worker_init must be a Task or None, not {type(worker_init).__name__}")
        if error_mode not in ("str", "exception"):
            raise ValueError(f"error_mode must be 'str' or 'exception', not {error_mode!r}")
        self.worker_init = worker_init
        self.error_mode = error_mode
        self.timeout = _seconds(timeout, "timeout")
        self.max_tasks_per_child = (None if max_tasks_per_child is None
                                    else _positive_int(max_tasks_per_child, "max_tasks_per_child"))
        self._pool = None
        self._lock = threading.Lock()  # guards _pool: start() and stop() may come from any thread

    def __repr__(self):
        state = "running" if self._pool else "stopped"
        where = self._ctx.get_start_method() if self._executor is None else f"on {type(self._executor).__name__}"
        return f"<TaskManager cpu_count={self._cpu_count} {where} {state}>"

    @property
    def cpu_count(self):
        return self._cpu_count

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Start the workers. With a worker_init, wait until every worker has run it (one that
        fails raises here); without one, return at once: tasks go to workers as they are ready."""
        with self._lock:
            pool = self._pool
            if pool is None or pool.closed:
                if self._executor is not None:
                    pool = _ExecutorPool(self._executor, self._cpu_count)
                else:
                    pool = _Pool(self._ctx, self._cpu_count, self.worker_init, self.max_tasks_per_child,
                                 init_label="worker_init")
                pool.start()
                self._pool = pool
                self._finalizer = weakref.finalize(self, pool.close)  # a manager dropped unstopped
        if self.worker_init is None:
            return
        try:
            pool.wait_ready()  # a failing worker_init raises here
        except BaseException:
            self._stop(0, pool)
            raise

    def stop(self):
        """Stop the workers; unfinished tasks are dropped, and calls waiting for them in other
        threads raise RuntimeError. Safe to call twice, or after errors."""
        self._stop(1.0)

    def _stop(self, grace, pool=None):
        with self._lock:
            if self._pool is None or (pool is not None and pool is not self._pool):
                return  # stopped already, maybe restarted since: not ours to stop
            pool, self._pool = self._pool, None
            self._finalizer.detach()
        pool.close(grace)

    def execute(self, tasks, tqdm=None, pbar=None, *, progress=True, timeout=_DEFAULT):
        """Run tasks (Task or TaskChain) and return their results in input order.

        progress: show a progress bar on stderr. tqdm: a tqdm-compatible class to draw it
        instead; pbar: an object with update(n) to report to instead.
        timeout: seconds per task for this call (default: the manager's timeout).
        """
        pool = self._running()
        call = _Call(*_task_list(tasks), self._timeout(timeout), self._errors)
        _check_functions(call.distinct_tasks(), pool.forked_main)
        return self._call(pool, call, tqdm, pbar, progress)

    def map(self, f, iterable, *, progress=False, timeout=_DEFAULT):
        """``execute([Task(f, x) for x in iterable])``: the results of f(x), in order."""
        pool = self._running()
        _check_functions([_mappable(f)], pool.forked_main)
        return self._call(pool, _Mapped(list(iterable), self._timeout(timeout), self._errors, f),
                          None, None, progress)

    def imap(self, f, iterable, *, timeout=_DEFAULT):
        """map() as an iterator: the results of f(x), in order, as they come.

        The input is read as the results are taken, a little ahead of them: it may be endless,
        and the memory used doesn't grow with its length. Closing the iterator (or leaving a
        for loop over it) drops the tasks not yet taken. An error raised by the input itself
        is raised after the results of the items before it.
        """
        pool = self._running()
        _check_functions([_mappable(f)], pool.forked_main)
        return self._stream(pool, f, iter(iterable), self._timeout(timeout))

    def _call(self, pool, call, tqdm, pbar, progress):
        """Run an execute() or map(): wait for all its results."""
        bar = _progress_bar(len(call.items), tqdm, pbar, progress and bool(call.items))
        if not call.items:
            return []
        _refuse_on_engine_thread(pool)  # before its work is queued: nobody would wait for it
        try:
            pool.put(_Job(call, 0, len(call.items)))
            self._wait(pool, call.wait, None if bar is None else lambda: call.report(bar))
        finally:
            if bar is not None and pbar is None:
                bar.close()
        if call.failure is not None:
            raise call.failure.exception()
        return call.results

    def _stream(self, pool, f, inputs, timeout):
        """imap(): the window starts at a few tasks per worker and grows with the results
        taken, up to a limit: what is read ahead stays bounded, and small for a consumer that
        takes few results."""
        _refuse_on_engine_thread(pool)
        limit = 4 * _MAX_BATCH * self._cpu_count
        stream = _Stream(pool, f, False, inputs, timeout,
                         lambda taken: min(limit, max(4 * self._cpu_count, taken)))
        yield from stream.results(lambda call: self._wait(pool, call.wait, None), self._unpack_failure)

    def _unpack_failure(self, failure):
        if self.error_mode == "exception":
            raise failure.exception()
        return failure.text

    @property
    def _errors(self):
        return "raise" if self.error_mode == "exception" else "text"

    def _timeout(self, timeout):
        return self.timeout if timeout is _DEFAULT else _seconds(timeout, "timeout")

    def submit(self, task, *, timeout=_DEFAULT):
        """Queue a Task or TaskChain to run; returns its id. Collect it with take() or as_completed()."""
        pool = self._running()
        if not isinstance(task, (Task, TaskChain)):
            raise TypeError(f"submit takes a Task or TaskChain, not {type(task).__name__}")
        timeout = self.timeout if timeout is _DEFAULT else _seconds(timeout, "timeout")
        payload = pool.payload(_entry_task(task))
        inbox = pool.inbox
        inbox.opened(1)
        try:
            pool.put(_Job(_Submitted(task, timeout, inbox), 0, 1, payload))
        except BaseException:
            inbox.opened(-1)
            raise
        return task.id

    def take(self, timeout=0):
        """One finished result of a submitted task, or None if none is ready.

        timeout=0 returns at once; a number waits up to that many seconds; None waits until a
        result is ready (or returns None at once when no task is open).
        """
        if timeout is not None:
            timeout = _seconds(timeout, "timeout", zero_ok=True)
        pool = self._running()
        finished = self._wait(pool, pool.inbox.get, timeout)
        if finished is None or finished is _TIMED_OUT:
            return None
        return self._unpack(finished)[1]

    def as_completed(self, timeout=None):
        """Yield (task, result) for each submitted task as it finishes, until none is open.

        timeout: seconds for the whole iteration; past it, TimeoutError is raised.
        """
        timeout = _seconds(timeout, "timeout")
        return self._completed(self._running(), timeout)

    def _completed(self, pool, timeout):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - monotonic())
            finished = self._wait(pool, pool.inbox.get, left)
            if finished is None:
                return
            if finished is _TIMED_OUT:
                raise TimeoutError(f"{pool.inbox.open} submitted tasks did not finish within {timeout} s")
            yield self._unpack(finished)

    @property
    def open_tasks(self):
        """Tasks submitted and not yet taken."""
        pool = self._pool
        return 0 if pool is None else pool.inbox.open

    def _running(self):
        pool = self._pool
        if pool is None:
            raise RuntimeError("the TaskManager is not running: use `with TaskManager() as tm:` or call start()")
        if pool.closed:
            raise pool.refusal()
        return pool

    def _wait(self, pool, wait_for, arg):
        """wait_for(arg), a wait for results. Ctrl-C stops the pool at once: no process is left."""
        if arg != 0:
            _refuse_on_engine_thread(pool)
        try:
            return wait_for(arg)
        except KeyboardInterrupt:
            self._stop(0, pool)
            raise

    def _unpack(self, finished):
        item, ok, value = finished
        if ok:
            return item, value
        return item, self._unpack_failure(value)


def _refuse_on_engine_thread(pool):
    if threading.current_thread() is pool.thread:
        raise RuntimeError("a TaskChain's next_task (or a Future's callback) runs on mplite's "
                           "engine thread, which can't wait for results: it is what delivers them")


class ProcessPoolExecutor(futures.Executor):
    """``concurrent.futures.ProcessPoolExecutor`` on mplite's engine: change one import.

    As the standard library's, with mplite's guarantees: a task that kills its worker fails
    only its own future (with WorkerDiedError, a BrokenProcessPool), the executor goes on; a
    task past ``timeout`` seconds fails with TimeoutError and its worker is replaced; a future's
    exception carries the worker's traceback. mp_context=None means spawn; batching is
    automatic, so ``map``'s chunksize is accepted and ignored.
    """

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, timeout=None):
        if max_workers is None:
            max_workers = _usable_cpus()
        elif isinstance(max_workers, int) and not isinstance(max_workers, bool) and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._timeout = _seconds(timeout, "timeout")
        self._mp_context = _context("spawn" if mp_context is None else mp_context)
        self._max_workers = _positive_int(max_workers, "max_workers")
        self._pool = _Pool(self._mp_context, self._max_workers,
                           None if initializer is None else Task(initializer, *initargs),
                           None if max_tasks_per_child is None
                           else _positive_int(max_tasks_per_child, "max_tasks_per_child"),
                           init_label="initializer", drain_at_exit=True)
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._pool.start()  # the workers start in the background; submit() may come at once
        weakref.finalize(self, self._pool.close, 1.0, True, False)  # dropped unshut: finish, then stop

    @property
    def _broken(self):
        """Why the pool broke (a failing initializer), or False: as the standard library's."""
        failure = self._pool.failure
        return False if failure is None else str(failure)

    def _refuse_after_shutdown(self):
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn, /, *args, **kwargs):
        with self._shutdown_lock:
            self._refuse_after_shutdown()
            future = futures.Future()
            self._pool.put(_Job(_FutureTask(future, Task._of(fn, args, kwargs), self._timeout), 0, 1))
            return future

    submit.__doc__ = futures.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1, buffersize=None):
        """Like ``map(fn, *iterables)``, each call run in a worker; results in order, lazily.

        timeout: seconds from this call for the whole iteration (concurrent.futures.TimeoutError).
        buffersize: at most this many calls submitted ahead of the results you have taken
        (as Python 3.14's; None submits every call at once).
        """
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or isinstance(buffersize, bool)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        deadline = None if timeout is None else monotonic() + timeout
        self._refuse_after_shutdown()
        _check_functions([_mappable(fn)], self._pool.forked_main)
        # Calls travel in chunks (of _Mapped), not a Future each. With no buffersize, all of
        # them are sent now, as the standard library's map() does; with one, that many.
        stream = _Stream(self._pool, fn, True, zip(*iterables), self._timeout,
                         lambda taken: buffersize or sys.maxsize, self._refuse_after_shutdown)
        stream.top_up()  # the first calls go now, as the standard library's do
        if buffersize is None and stream.error is not None:
            self._pool.drop(stream.calls)
            raise stream.error

        def wait(call):
            if not call.done.wait(None if deadline is None else max(0.0, deadline - monotonic())):
                raise futures.TimeoutError()

        return stream.results(wait, _raise_remote)

    def shutdown(self, wait=True, *, cancel_futures=False):
        """No more submit(); pending futures still run (unless cancel_futures), then the workers
        stop. wait: return only once that is done."""
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures and not self._pool.closed:
            try:
                self._pool.put(self._pool.cancel_waiting_futures)
            except RuntimeError:  # it closed meanwhile (BrokenProcessPool is one): nothing waits
                pass
        self._pool.close(1.0, drain=True, wait=wait)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is KeyboardInterrupt:  # Ctrl-C: stop at once, leave no process behind
            self.shutdown(wait=False, cancel_futures=True)
            self._pool.close(0)
        else:
            self.shutdown(wait=True)
        return False


def _raise_remote(failure):
    """Raise a task's failure as the standard library's executor does: with the worker's
    traceback as text in __cause__ (and, from mplite, its frames in the traceback)."""
    raise _remote_exception(failure)


def _remote_exception(failure):
    exc = failure.exception()
    if failure.frames and exc.__cause__ is None:
        exc.__cause__ = _RemoteTraceback(f'\n"""\n{failure.text}\n"""')
    return exc


class UnpicklableTaskError(TypeError, pickle.PicklingError):
    """A task whose function or arguments can't travel to a worker, even by value: a lock, an
    open file, an instance of a class typed into a notebook. Lambdas and closures can."""


class WorkerDiedError(ChildProcessError, BrokenProcessPool):
    """A task's worker process died while running it (killed, crashed, os._exit()).

    A ChildProcessError, as in mplite 1.x, and a BrokenProcessPool, so that code written for
    concurrent.futures catches it too; only that task fails, the pool goes on.
    """


# ---------------------------------------------------------------------------------------------
# How callers wait: an owner for each piece of work, which the engine thread fills in
#
# The engine calls an owner's deliver(slot, ok, value) for each finished task (deliver_results
# for a run of plain results at once), claim() before it sends a job, and stopped(error) for
# work that will never finish because the pool stopped. A caller waits on its owner only.
# ---------------------------------------------------------------------------------------------

_TIMED_OUT = object()
# What user code can raise while its task is pickled, unpickled or chained, to fail that task
# alone (SystemExit too: a __reduce__ that calls sys.exit() must not stop mplite's engine).
_TASK_ERRORS = (Exception, SystemExit)
_REDRAW_SECONDS = 0.1  # how often a waiting execute() redraws its progress bar
# A caller waits in slices this long: a Ctrl-C that another thread of the program took (the
# kernel gives a process's SIGINT to any thread) is raised in the main thread only once its wait
# returns.
_WAKE_SECONDS = 0.5
_STREAM_CHUNK = 4096   # the most tasks a streamed map's chunk holds


class _Owner:
    __slots__ = ()
    plain = False      # its items are Tasks whose results go straight in: deliver_results()
    cancelled = False  # it wants no more results

    def task(self, slot):
        """The Task that runs next for a slot (errors name it)."""
        return _entry_task(self.items[slot])

    def run(self, start, stop):
        """The tasks of slots start..stop as they travel: a run of a message (see _calls)."""
        return None, False, [_entry(item) for item in self.items[start:stop]]

    def claim(self):
        """The engine is about to send one of its jobs: may it go?"""
        return True

    def stopped(self, error):
        """The pool stopped (or broke) before this work was done."""


class _Call(_Owner):
    """One execute() call: its tasks, their results in input order, and how many are to come.

    errors: what a task's error does: "text" puts its traceback text in its place, "raise"
    fails the call (execute() raises it), "keep" puts the _Failure itself in its place.
    """
    __slots__ = ("items", "results", "left", "timeout", "errors", "plain", "f", "fresh",
                 "failure", "kept", "cancelled", "shown", "done")

    def __init__(self, items, kinds, timeout, errors, f=None, fresh=True):
        self.items = items  # what runs next for each slot: a Task, or a TaskChain's current step
        self.results = [None] * len(items)
        self.left = len(items)
        self.timeout = timeout
        self.errors = errors
        self.plain = f is not None or kinds == {Task}  # no chains: results go straight in
        self.f = f  # the one function of every task, which have no keyword arguments; or None
        if f is None and self.plain and _one_function(items) and not any(map(_task_keywords, items)):
            self.f = items[0].func
        self.fresh = fresh  # its tasks may differ from those before: measure their length afresh
        self.failure = None
        self.kept = False  # a _Failure is among the results ("keep")
        self.cancelled = False
        self.shown = 0
        self.done = threading.Event()

    def run(self, start, stop):
        if self.f is None:
            return _Owner.run(self, start, stop)
        return self.f, True, list(map(_task_args, self.items[start:stop]))

    def distinct_tasks(self):
        """One task for each distinct function of the call."""
        if self.f is not None:
            return [self.task(0)]
        return {id(task.func): task for task in map(_entry_task, self.items)}.values()

    def wait(self, report):
        """Block until every result is in, or the call failed; report() progress meanwhile."""
        while not self.done.wait(_REDRAW_SECONDS if report else _WAKE_SECONDS):
            if report:
                report()
        if report:
            report()

    def deliver_results(self, start, values):
        """Results of the tasks start, start+1, ... at once (no chains among them)."""
        if not self.cancelled:
            self.results[start:start + len(values)] = values
            self.left -= len(values)
            if not self.left:
                self.done.set()

    def deliver(self, slot, ok, value):
        if self.cancelled:
            return
        if ok:
            self.results[slot] = value
        elif self.errors == "raise":
            return self.abort(value)
        elif self.errors == "keep":
            self.results[slot] = value
            self.kept = True
        else:
            self.results[slot] = value.text
        self.left -= 1
        if not self.left:
            self.done.set()

    def abort(self, failure):
        self.failure = failure
        self.cancelled = True
        self.done.set()

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

    def __init__(self, items, timeout, errors, f, fresh=True, star=False):
        super().__init__(items, None, timeout, errors, f, fresh)
        self.star = star

    def task(self, slot):
        return Task(self.f, *self.items[slot]) if self.star else Task(self.f, self.items[slot])

    def run(self, start, stop):
        return self.f, self.star, self.items[start:stop]


class _Stream:
    """The results of a function over an input, in order, as an iterator, for imap() and
    ProcessPoolExecutor.map(). The input goes out in chunks, each a _Mapped call, at most a
    window ahead of the results taken; window(taken) says how far."""

    def __init__(self, pool, f, star, inputs, timeout, window, may_send=None):
        self.pool = pool
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
            fresh = not (self.taken or self.calls)
            call = _Mapped(chunk, self.timeout, "keep", self.f, fresh, self.star)
            self.pool.put(_Job(call, 0, len(chunk)))
            self.calls.append(call)
            self.ahead += len(chunk)

    def results(self, wait, raise_error):
        """The results: wait(call) waits for a chunk; raise_error(failure) turns a task's
        failure into what the caller raises, or returns what takes the task's place."""
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
                self.ahead -= len(call.results)
                self.taken += len(call.results)
                if not call.kept:
                    yield from call.results
                    continue
                for result in call.results:
                    yield raise_error(result) if result.__class__ is _Failure else result
        finally:
            if calls:  # left early: drop the rest
                self.pool.drop(calls)


class _Submitted(_Owner):
    """One submit()ted task: its result goes to the pool's inbox, for take()."""
    __slots__ = ("item", "items", "timeout", "inbox")

    def __init__(self, item, timeout, inbox):
        self.item = item
        self.items = [item]
        self.timeout = timeout
        self.inbox = inbox

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

    def get(self, timeout):
        """The next finished task; None if no task is open; _TIMED_OUT after timeout seconds."""
        deadline = None if timeout is None else monotonic() + timeout
        with self.ready:
            while not self.finished:
                if self.error is not None:
                    raise RuntimeError(self.error)
                if not self.open:
                    return None
                left = None if deadline is None else deadline - monotonic()
                if left is not None and left <= 0:
                    return _TIMED_OUT
                self.ready.wait(_WAKE_SECONDS if left is None else min(left, _WAKE_SECONDS))
            self._count(-1)
            return self.finished.popleft()

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


class _FutureTask(_Owner):
    """One ProcessPoolExecutor.submit(): its result settles a concurrent.futures.Future."""
    __slots__ = ("future", "items", "timeout", "claimed")
    plain = True

    def __init__(self, future, task, timeout):
        self.future = future
        self.items = [task]
        self.timeout = timeout
        self.claimed = False

    def claim(self):
        if self.claimed:  # sent before, and back in the queue: its worker died before it began
            return True
        self.claimed = True
        return self.future.set_running_or_notify_cancel()  # False: it was cancelled

    def deliver_results(self, start, values):
        self._settle(self.future.set_result, values[0])

    def deliver(self, slot, ok, value):
        if ok:
            return self._settle(self.future.set_result, value)
        self._settle(self.future.set_exception, _remote_exception(value))

    def stopped(self, error):
        if not isinstance(error, BrokenProcessPool):
            error = BrokenProcessPool(str(error))
        self._settle(self.future.set_exception, error)

    def _settle(self, how, value):
        try:
            how(value)
        except futures.InvalidStateError:  # cancelled by its owner meanwhile
            pass


# ---------------------------------------------------------------------------------------------
# The engine
#
# How a task travels:
#
#     caller threads            the engine thread (one per pool)          worker processes
#
#     execute() ──┐
#     submit()  ──┼─ put(job) ─► requests ─► pending ─► batch ─► pipe ──► run each task,
#     Future    ──┘                 │                                     journal its answer
#        ▲                    self-pipe wakes                                    │
#        └──── owner ◄─ deliver ◄─ answers ◄───────────────────── pipe ◄─────────┘
#      (an Event, the inbox,        deaths (a pidfd per worker), timeouts (the clock)
#       or a Future)
#
# One engine thread per pool owns all engine state: the workers, the queue, which worker holds
# which task. Callers never touch it: they put a job (or a command) on `requests`, wake the
# engine through a socket it always waits on, and wait on their own owner (see above). So work
# moves, timeouts fire and dead workers are replaced whether or not anybody is inside an
# mplite call, and any number of threads can use one pool.
#
# Every worker has its own Pipe. The engine sends a worker messages, each a pickled list of
# tasks; the worker answers with one frame per task. The engine sleeps in a selector (epoll) on
# all pipes, process exits (pidfds) and its wake-up socket: a result, a death or a new job wakes
# it at once, and nothing polls. (The portable path waits in multiprocessing.connection.wait()
# on the pipes alone: see _PORTABLE.)
#
# A system call costs microseconds, more than a tiny task, so a worker does not send each frame
# on its own: it writes them to a journal in shared memory and sends the journal down the pipe
# in one write when the message is done (or every few milliseconds). If the worker dies before
# that, the engine reads the frames it missed from the journal: a worker that dies costs only
# the task it was running, and finished tasks keep their results. Frames are numbered in the
# order the worker wrote them, which is how the engine knows which of them it already has.
#
# _Worker.jobs, the tasks sent to a worker and not yet answered, in the order the worker runs
# them, is the one record of which task each worker holds: the first of them is the one running
# (or just done, its answer not yet sent).
#
# Fork and threads: with the fork start method, replacement workers are forked by the engine
# thread while other threads run. The engine holds none of its locks when it forks (it takes
# them only to swap a request queue or to hand over a result), and a worker never uses them.
# A lock that one of *your* threads holds at that moment stays held in the worker (see the
# README); spawn and forkserver workers start clean.
# ---------------------------------------------------------------------------------------------
_U64 = struct.Struct("<Q")  # frame lengths, both ways (zero asks a worker to exit), and counters
_ANSWERS = struct.Struct("<IBd")  # a worker's frame starts: answers, their form, seconds per task
_MIXED, _RESULTS, _LISTED, _STARTED = range(4)  # forms: journal entries of any kind, of _DONE
# results only, or (for _SCALAR results only) the results as one list: one unpickle in the
# parent; or no answers, only word that the tasks of a message begin (where one has a timeout).
# Only immutable results are listed at flush time: another could have changed since its task.
_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})
_KIND_OF_BYTE = bytes(b & 7 for b in range(256))  # a journal entry's kind, from its low byte
_NO_KWARGS = {}
# The kinds of answer. A result is _DONE (pickled) or, for _SCALARS, _SCALAR (marshalled:
# half the cost of pickle.dumps, and parent and workers run the same interpreter).
_DONE, _FAILED, _READY, _INIT_FAILED, _UNREADABLE, _SCALAR = range(6)

# The journal, in shared memory: the number of its first answer; how many messages the worker
# has read; for each answer, where it ends and its kind (end << 3 | kind; 0 where none is
# written yet); then the pickled answers.
_ENTRIES = 4096
_ENDS_AT = 16
_DATA_AT = _ENDS_AT + 8 * _ENTRIES
_JOURNAL_SIZE = _DATA_AT + (1 << 20)
_FLUSH_SECONDS = 0.02  # a long message's answers are sent this often (the clock is read every 8 tasks)

_READ_SIZE = 1 << 18
_BIG_FRAME = 1 << 20  # a frame larger than this is read straight into its own buffer
# A worker is sent a second message while busy only if it is small: half the socket's buffer at
# most, so the buffer takes it without blocking. A large message waits for an idle worker, which
# is reading, never writing: so the parent never blocks sending to a worker that is itself
# blocked sending a large result.
_PREFETCH_BYTES = 1 << 16
# Batch sizing: short tasks travel together, aiming at this much work per message; a task that
# takes longer travels alone, so load balancing is not lost.
_BATCH_SECONDS = 0.004
_MAX_BATCH = 1024
_UNPICKLE_SECONDS = 60  # the most a message may take to unpickle where its tasks have a timeout
_BOOT_DEATHS = 50  # workers killed before they were ready, in a row, before we give up


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
                return out.post(_INIT_FAILED, _describe(exc)[0])
        out.post(_READY, os.getpid())
        _serve_messages(link, out)
    except OSError:  # the parent is gone: nobody to tell
        pass


def _serve_messages(link, out):
    while True:
        message = _receive_frame(link)
        if not message:  # asked to exit, or the parent is gone
            return
        out.note_received()
        try:
            each, runs = pickle.loads(message)
        except BaseException:
            out.post(_UNREADABLE, None)
            continue
        del message
        if each:  # a timeout counts from here: unpickling may have imported modules for a while
            out.started()
        out.run(_calls(runs), sum(len(run[2]) for run in runs), each)
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
    """A worker's answers on their way to the parent, kept in its journal until the pipe has them.

    The journal is laid out as the answers travel: for each answer where it ends and what kind it
    is, then the answers, each pickled on its own. A flush sends them in one write, then empties it.
    """

    def __init__(self, link, journal):
        mem = memoryview(journal.buffer)
        self.link = link
        self.number = 0  # of the journal's first answer: answers sent so far
        self.messages = 0  # read from the parent
        self.head = mem[:_ENDS_AT]
        self.ends = mem[_ENDS_AT:_DATA_AT]
        self.data = mem[_DATA_AT:]

    def run(self, calls, n, each):
        """Run a message's n tasks, journal each answer, send them all (and some on the way)."""
        ends, data, room = self.ends.cast("Q"), self.data, len(self.data)
        dumps, scalar, scalars = pickle.dumps, marshal.dumps, _SCALARS  # locals: this is the hot loop
        count = end = 0
        values = []  # the _SCALAR results in the journal: all of its answers, if as many
        started = flushed = monotonic()
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
                except BaseException as exc:
                    error = TypeError(f"the result of {_short(Task(f, *args, **kwargs))}, a "
                                      f"{type(value).__name__}, can't be pickled to be sent back: {exc}")
                    kind, blob = _FAILED, dumps(_describe(error), -1)
            stop = end + len(blob)
            if stop > room or count == _ENTRIES:  # full: send what it holds first
                self.flush(count, end, values)
                count, end, stop, values = 0, 0, len(blob), []
            if stop > room:  # too large for the journal: it goes on its own, straight away
                self.send_alone(kind, blob)
            else:
                data[end:stop] = blob
                ends[count] = stop << 3 | kind  # written last: only now does the answer count
                end = stop
                count += 1
                if kind == _SCALAR:
                    values.append(value)
            # With a timeout the parent must see each task end: it times the next from there.
            if each or (count & 7 == 0 and monotonic() - flushed > _FLUSH_SECONDS):
                self.flush(count, end, values)
                count = end = 0
                values = []
                flushed = monotonic()
        self.flush(count, end, values, (monotonic() - started) / n)  # this sizes later batches

    def note_received(self):
        """Tell the parent, should this process die, that the tasks of the message just read began."""
        self.messages += 1
        _U64.pack_into(self.head, 8, self.messages)

    def started(self):
        """Tell the parent the first task of the message just read starts now: a frame of no
        answers that gives the number of that message."""
        self.link.write([_U64.pack(_ANSWERS.size) + _ANSWERS.pack(self.messages, _STARTED, -1.0)])

    def post(self, kind, value):
        """Send an answer that is not a task's: ready, init failed, unreadable message."""
        self.send_alone(kind, pickle.dumps(value, -1))

    def flush(self, count, end, values, spent=-1.0):
        """Send the journal's answers: as one pickled list where they are all _SCALAR results."""
        if count or spent >= 0:
            if count and len(values) == count:
                listed = pickle.dumps(values, -1)
                self.link.write([_U64.pack(_ANSWERS.size + len(listed)) +
                                 _ANSWERS.pack(count, _LISTED, spent), listed])
            else:
                kinds = self.ends[:8 * count:8].tobytes().translate(_KIND_OF_BYTE)  # each entry's low byte
                form = _MIXED if kinds.strip(bytes([_DONE])) else _RESULTS
                size = _ANSWERS.size + 8 * count + end
                self.link.write([_U64.pack(size) + _ANSWERS.pack(count, form, spent),
                                 self.ends[:8 * count], self.data[:end]])
            self.ends[:8 * count] = bytes(8 * count)  # empty the journal first, then renumber it
            self.number += count
            _U64.pack_into(self.head, 0, self.number)

    def send_alone(self, kind, blob):
        size = _ANSWERS.size + 8 + len(blob)
        self.link.write([_U64.pack(size) + _ANSWERS.pack(1, _RESULTS if kind == _DONE else _MIXED, -1.0),
                               _U64.pack(len(blob) << 3 | kind), blob])
        self.number += 1
        _U64.pack_into(self.head, 0, self.number)


def _journal_answers(journal):
    """(number, kind, pickled answer) for each answer a journal holds."""
    mem = memoryview(journal.buffer)
    number = _U64.unpack_from(mem, 0)[0]
    start = _DATA_AT
    for end_kind in mem[_ENDS_AT:_DATA_AT].cast("Q"):
        if not end_kind:
            break
        stop = _DATA_AT + (end_kind >> 3)
        yield number, end_kind & 7, bytes(mem[start:stop])
        number += 1
        start = stop


def _exit_when_closed(lifeline):
    """Worker thread: the parent holds the only other end, so EOF here means it has died."""
    try:
        while True:
            lifeline.recv_bytes()
    except (EOFError, OSError):
        os._exit(1)


def _receive_frame(link):
    """A worker's blocking read of one message; None at EOF."""
    header = _read_exactly(link, _U64.size)
    return header and _read_exactly(link, _U64.unpack(header)[0])


def _read_exactly(link, n):
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = link.read_into(view)
        if not got:
            return None
        view = view[got:]
    return buf


# Pipes, both ways, carry a stream of frames: each a length (_U64) and its bytes. A link moves
# those bytes over one end of a Pipe. On POSIX it reads and writes the socket's descriptor
# itself: one system call a message, no copies. The portable link (Windows, where a Pipe is a
# named pipe, or wherever MPLITE_PORTABLE=1) uses only the Connection's own send_bytes and
# recv_bytes; each write is one Connection message.

class _FdLink:
    """One end of a socket-pair Pipe, read and written through its descriptor (POSIX)."""
    buffered = False  # never: a read takes only what the socket has

    def __init__(self, conn):
        self.fd = self.waitable = conn.fileno()

    def write(self, parts):
        """Write byte buffers as one message: one system call, unless the message is large."""
        written = os.writev(self.fd, parts)
        for part in parts:
            if written >= len(part):
                written -= len(part)
                continue
            view = memoryview(part)[written:]
            while view:
                view = view[os.write(self.fd, view):]
            written = 0

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
        self.rest = memoryview(b"")  # what a read has taken from the pipe and not handed on yet

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
    """What the engine uses of selectors' interface, over multiprocessing.connection.wait(),
    which waits on Connections and sockets on every system (selectors can't, on Windows)."""

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


# The switch between the two paths: the portable one on Windows, or when asked for (CI runs the
# suite both ways on Linux). The portable engine watches each worker's pipe alone, and takes its
# end (EOF) as the worker's death: a Windows process has one handle per pipe or process to wait
# on, and wait() takes at most 63 of them.
_PORTABLE = sys.platform == "win32" or os.environ.get("MPLITE_PORTABLE") == "1"
_Link = _ConnLink if _PORTABLE else _FdLink
_Selector = _WaitSelector if _PORTABLE else selectors.DefaultSelector
_MAX_WORKERS = 61 if sys.platform == "win32" else None  # the wake-up socket and 61 pipes: 62 handles


class _Job:
    """Tasks of one owner that travel together: owner.items[start:stop], run in that order.

    A job in a worker's queue shrinks from the front as results arrive, so its start is always
    the task that worker is running.
    """
    __slots__ = ("owner", "start", "stop", "payload")

    def __init__(self, owner, start, stop, payload=None):
        self.owner = owner
        self.start = start
        self.stop = stop
        self.payload = payload  # a single task, pickled alone, where it must travel that way


class _Worker:
    """One worker process, its pipe, and the jobs it holds."""

    def __init__(self, process, conn, journal, max_tasks):
        self.process = process
        self.sentinel = process.sentinel if _PORTABLE else _exit_fd(process)  # see _PORTABLE
        self.conn = conn
        self.link = _Link(conn)
        self.prefetch_bytes = min(_PREFETCH_BYTES, self.link.room() // 2)
        self.journal = journal  # shared memory: frames it wrote and may not have sent
        self.jobs = deque()     # sent, not yet answered, in running order: jobs[0].start runs first
        self.msgs = deque()     # how many of those tasks each message in flight still holds
        self.since = 0.0        # when it was last heard from: the start of jobs[0].start, as seen here
        self.ready = False      # has said it is ready (worker_init done)
        self.open = True        # may be sent more work
        self.eof = False        # its end of the pipe is closed
        self.left = max_tasks   # tasks it may still be sent (max_tasks_per_child), None: no limit
        self.overdue = None     # (owner, slot) of the task it was stopped for, past its timeout
        self.received = 0       # answers read from its pipe
        self.sent = 0           # messages of tasks sent to it
        self.begun = 0          # the last of those it said it began (_STARTED), by number
        self.holds = {}         # globals of by-value functions it was sent: see _pickle
        self.holds_since = 0    # the pool's arrivals when that record began
        self._buf = b""         # the start of a frame, read without its end
        self._read_into = memoryview(bytearray(_READ_SIZE))  # reused: a fresh 256 KiB each read
        # would be mapped and unmapped by malloc every time, in a thread's arena
        self._big = None        # a large frame being read, and how much of it has arrived
        self._have = 0

    def send(self, body):
        self.link.write([_U64.pack(len(body)), body])

    def close(self):
        self.conn.close()
        if self.sentinel != self.process.sentinel:
            os.close(self.sentinel)

    def receive(self):
        """Read what the worker has sent (one read, which won't block); return whole frames."""
        if self._big is not None:
            got = self.link.read_into(memoryview(self._big)[self._have:])
            if not got:
                raise EOFError
            self._have += got
            if self._have < len(self._big):
                return ()
            frame, self._big = self._big, None
            return (frame,)
        got = self.link.read_into(self._read_into)
        if not got:
            raise EOFError
        data = self._read_into[:got]
        buf = self._buf + data if self._buf else data
        frames, pos, end = [], 0, len(buf)
        unpack = _U64.unpack_from
        while end - pos >= 8:
            n = unpack(buf, pos)[0]
            if pos + 8 + n > end:
                if n >= _BIG_FRAME:
                    self._big = bytearray(n)
                    self._have = end - pos - 8
                    self._big[:self._have] = buf[pos + 8:]
                    pos = end
                break
            frames.append(bytes(buf[pos + 8:pos + 8 + n]))
            pos += 8 + n
        self._buf = bytes(buf[pos:])
        return frames


class _Scheduling:
    """Part of _Pool: which tasks go to which worker, and when. Engine thread only."""

    def _dispatch(self):
        """Give work to idle workers first, then one more message to each busy one that is on time."""
        while self._missing:
            self._missing -= 1
            self._spawn()
        for w in self.workers:
            if not (self.pending or self.parked):
                return
            if w.ready and w.open and not w.msgs:
                self._send_work(w)
        now = monotonic()
        for w in self.workers:
            if not (self.pending or self.parked):
                return
            if w.ready and w.open and len(w.msgs) == 1 and self._on_time(w, now):
                self._send_work(w)

    def _on_time(self, w, now):
        """Is w's work going as fast as tasks have gone so far? Then it will soon want more.

        A task sent ahead waits behind the one running, and can't be taken back if another
        worker falls idle first; so only workers that aren't stuck on a long task get one.
        """
        return self.avg is not None and now - w.since <= 2 * self.avg * w.msgs[0]

    def _send_work(self, w):
        if self.parked is not None:
            if w.msgs:
                return  # nothing more is prefetched until the parked message is on its way
            jobs, count, message = self.parked
            self.parked = None
            if w.left is not None and count > w.left:  # too many for this worker: batch again
                self.pending.extendleft(reversed(jobs))
                return self._send_work(w)
        else:
            if w.holds_since != self._arrivals:  # new work came: send globals afresh (see _pickle)
                w.holds, w.holds_since = {}, self._arrivals
            # A message sent ahead may be parked and go to another worker: it can't count on
            # what this one holds, nor add to its record until it is sent.
            holds = w.holds.copy() if w.msgs else w.holds
            message = None
            while message is None:  # None: none of those could be pickled; try the next ones
                jobs = self._next_batch(self._batch_size(w))
                if not jobs:
                    return
                message = self._pickle_batch(jobs, holds)
            count = sum(j.stop - j.start for j in jobs)  # some may have been dropped
            if w.msgs and len(message) > w.prefetch_bytes:
                if holds:
                    message = self._pickle_batch(jobs, None)
                self.parked = (jobs, count, message)
                return
            w.holds = holds
        w.jobs.extend(jobs)
        w.msgs.append(count)
        if len(w.msgs) == 1:
            w.since = monotonic()
        try:
            w.send(message)
        except OSError:  # the worker is gone; these jobs never reached it, its sentinel will tell
            for _ in jobs:
                w.jobs.pop()
            w.msgs.pop()
            w.open = False
            self.pending.extendleft(reversed(jobs))
            return
        w.sent += 1
        if w.left is not None:
            w.left -= count
            if w.left == 0:  # max_tasks_per_child: it exits after these, and is replaced
                w.open = False
                try:
                    w.send(b"")
                except OSError:
                    pass

    def _batch_size(self, w):
        """How many tasks w gets next: as many as make a few milliseconds of work."""
        n = self._tasks_for(_BATCH_SECONDS, _MAX_BATCH)
        return n if w.left is None else min(n, w.left)

    def _tasks_for(self, seconds, most):
        """How many tasks make `seconds` of work, as far as they have been measured; fewer near
        the end of the queue, so that the last of them spread over all the workers."""
        if self.avg is None:
            return 1
        n = max(1, min(most, int(seconds / max(self.avg, 1e-7))))
        if n > 1:
            n = max(1, min(n, ceil(self._pending_count(2 * self.size * n) / (2 * self.size))))
        return n

    def _next_batch(self, n):
        """Take the next n tasks off the queue (fewer if there are fewer)."""
        jobs, count, pending = [], 0, self.pending
        while pending and count < n:
            job = pending[0]
            if not job.owner.claim():  # a future cancelled while it waited
                pending.popleft()
                continue
            size = job.stop - job.start
            if size <= n - count:
                jobs.append(pending.popleft())
                count += size
            else:  # split it: the front travels now, the rest stays queued
                take = n - count
                jobs.append(_Job(job.owner, job.start, job.start + take))
                job.start += take
                count = n
        return jobs

    def _pending_count(self, enough):
        """Tasks queued, counted up to `enough`."""
        count = 0
        for job in self.pending:
            count += job.stop - job.start
            if count >= enough:
                break
        return count

    def _pickle_batch(self, jobs, holds):
        """The message for these jobs, or None if none of them can be pickled.

        holds: what the worker holds of the globals of functions sent by value (see _pickle)."""
        each = any(j.owner.timeout is not None for j in jobs)
        runs = [(None, False, [j.payload]) if j.payload is not None else j.owner.run(j.start, j.stop)
                for j in jobs]
        try:
            return _pickle((each, runs), self.forked_main, holds)
        except _TASK_ERRORS:
            pass
        # Some task can't travel: pickle them one by one, fail that one, send the others.
        singles = []
        for job in jobs:
            for slot in range(job.start, job.stop):
                single = self._single(job.owner, slot, job.payload)
                if single is not None:
                    singles.append(single)
        jobs[:] = singles
        return _pickle((each, [(None, False, [j.payload]) for j in singles])) if singles else None

    def _single(self, owner, slot, payload=None):
        """A job of one task, pickled alone; None if it can't be, and then it has failed."""
        try:
            task = owner.task(slot)
            return _Job(owner, slot, slot + 1, payload or _pickle_task(task, self.forked_main))
        except UnpicklableTaskError as exc:
            self._refuse(owner, slot, slot + 1, exc)
            return None

    def _refuse(self, owner, start, stop, error):
        """Tasks that can't be sent: an execute() or map() raises the error (bad input); each
        other task (of imap() too) gets it as its own error, in its place."""
        failure = _Failure.of(error)
        if isinstance(owner, _Call) and owner.errors != "keep":
            owner.abort(failure)
            self._forget(owner)
        else:
            for slot in range(start, stop):
                owner.deliver(slot, False, failure)

    def _forget(self, owner):
        """Drop the queued jobs of an aborted execute(); results of the others are ignored."""
        self.pending = deque(j for j in self.pending if j.owner is not owner)
        if self.parked is not None:
            jobs, self.parked = self.parked[0], None
            self.pending.extendleft(reversed([j for j in jobs if j.owner is not owner]))

    def cancel_waiting_futures(self):
        """A command: cancel the futures that no worker has been sent yet (shutdown(cancel_futures))."""
        keep = deque()
        for job in self.pending:
            owner = job.owner
            if isinstance(owner, _FutureTask) and not owner.claimed:
                owner.future.cancel()
            elif isinstance(owner, _Mapped):  # map()'s calls not sent yet raise CancelledError
                failure = _Failure.of(futures.CancelledError())
                for slot in range(job.start, job.stop):
                    owner.deliver(slot, False, failure)
            else:
                keep.append(job)
        self.pending = keep


class _Answers:
    """Part of _Pool: reading workers' answers and handing each to its owner. Engine thread only."""

    def _read(self, w, now):
        try:
            frames = w.receive()
        except (EOFError, OSError):
            w.eof = True
            self._selector.unregister(w.link.waitable)
            if _PORTABLE:  # its pipe closed: it has ended (see _PORTABLE)
                self._reap(w, now)
            return
        for frame in frames:
            self._take(w, frame, now)
        if w.link.buffered:  # a portable link read a message larger than the read buffer
            self._read(w, now)

    def _take(self, w, frame, now):
        """Deliver the answers in one of a worker's frames: the hot path, a few C calls per frame."""
        count, form, spent = _ANSWERS.unpack_from(frame, 0)
        if form == _STARTED:
            w.begun = count
            w.since = now
            return
        if spent >= 0:
            self.avg = spent if self.avg is None else self.avg + 0.3 * (spent - self.avg)
        w.received += count
        if form == _LISTED:
            return self._deliver(w, pickle.loads(memoryview(frame)[_ANSWERS.size:]), now)
        data_at = _ANSWERS.size + 8 * count
        ends = struct.unpack_from(f"<{count}Q", frame, _ANSWERS.size)
        stops = list(map(add, map(rshift, ends, repeat(3)), repeat(data_at)))  # end << 3 | kind
        starts = [data_at] + stops[:-1]
        if form == _RESULTS:  # unpickle them with no Python loop
            try:
                values = list(map(pickle.loads, map(memoryview(frame).__getitem__, map(slice, starts, stops))))
            except _TASK_ERRORS:
                pass  # one of them can't be unpickled here: go one by one, below
            else:
                return self._deliver(w, values, now)
        for start, stop, end_kind in zip(starts, stops, ends):
            self._take_one(w, end_kind & 7, frame[start:stop], now)

    def _deliver(self, w, values, now):
        """Results of the tasks at the front of w.jobs, in order."""
        jobs, i, n = w.jobs, 0, len(values)
        while i < n:
            job = jobs[0]
            owner, start = job.owner, job.start
            k = min(n - i, job.stop - start)
            job.start = start + k
            if job.start == job.stop:
                jobs.popleft()
            if owner.plain:
                owner.deliver_results(start, values[i:i + k])
            else:
                for j in range(k):
                    self._finish(owner, start + j, True, values[i + j])
            i += k
        self._answered(w, n, now)

    def _take_one(self, w, kind, blob, now):
        try:
            value = marshal.loads(blob) if kind == _SCALAR else pickle.loads(blob)
        except _TASK_ERRORS as exc:  # a result the parent can't unpickle: an error of that task
            job = w.jobs[0]
            task = job.owner.task(job.start)
            value = _describe(TypeError(f"the result of {_short(task)} can't be unpickled here: {exc}"))
            kind = _FAILED
        if kind == _DONE or kind == _SCALAR:
            return self._deliver(w, [value], now)
        if kind == _FAILED:
            owner, slot = _pop_head(w.jobs)
            self._answered(w, 1, now)
            return self._finish(owner, slot, False, _Failure(*value))
        if kind == _READY:
            w.ready = True
            w.since = now
            self._boot_deaths = 0
            if not self._missing and all(w.ready for w in self.workers):
                self.ready.set()  # start() returns
        elif kind == _INIT_FAILED:
            raise BrokenProcessPool(f"{self.init_label} {_short(self.init)} failed in a worker process:\n{value}")
        else:  # _UNREADABLE: a task in that message can't be unpickled there; send them one by one
            w.holds = {}  # it may have stopped before the globals that message carried
            singles = []
            for _ in range(w.msgs.popleft()):
                payload = w.jobs[0].payload  # only a job of one task has one
                singles.append(self._single(*_pop_head(w.jobs), payload))
            w.since = now
            self.pending.extendleft(reversed([j for j in singles if j is not None]))

    def _answered(self, w, n, now):
        """n more tasks of w's messages are done; the next one started now."""
        w.since = now
        msgs = w.msgs
        while n:
            if msgs[0] <= n:
                n -= msgs.popleft()
            else:
                msgs[0] -= n
                n = 0

    def _finish(self, owner, slot, ok, value):
        if owner.cancelled:
            return
        item = owner.items[slot]
        if ok and isinstance(item, TaskChain):
            try:
                step = _next_step(item, value)
            except _TASK_ERRORS as exc:
                ok, value = False, _Failure(*_describe(exc))
            else:
                if step is not None:  # the chain goes on, ahead of the queue
                    owner.items[slot] = step
                    self.pending.appendleft(_Job(owner, slot, slot + 1))
                    return
        owner.deliver(slot, ok, value)
        if owner.cancelled:  # an execute() in exception mode failed: the rest of it is not wanted
            self._forget(owner)


class _Faults:
    """Part of _Pool: workers starting, dying, overrunning their timeout. Engine thread only."""

    def _spawn(self):
        conn, child_conn = self.ctx.Pipe()
        # Shared memory that the worker inherits, or gets as a file descriptor where it's spawned.
        # (What RawArray is made of, without the ctypes import that costs a cold start 10 ms.)
        journal = Arena(_JOURNAL_SIZE)
        process = self.ctx.Process(target=_worker_main, name="mplite-worker",
                                   args=(child_conn, journal, self._lifeline, self._lifeline_end, self._init))
        if not self.fork and os.name == "posix":
            # Started by the first spawn, multiprocessing's resource tracker unblocks SIGINT
            # when it is done, and a forkserver would keep it blocked for all its children:
            # let them start now, outside the window below.
            resource_tracker.ensure_running()
            if self.ctx.get_start_method() == "forkserver":
                forkserver.ensure_running()
        try:
            with _sigint_blocked(), _main_path_for_workers(self.fork):
                process.start()
        finally:
            child_conn.close()
        w = _Worker(process, conn, journal, self.max_tasks)
        self.workers.append(w)
        if not _PORTABLE:
            self._selector.register(w.sentinel, selectors.EVENT_READ, w)
        self._selector.register(w.link.waitable, selectors.EVENT_READ, w)

    def _reap(self, w, now):
        """A worker process has ended: collect what it sent, charge its running task, replace it."""
        while not w.eof and wait([w.link.waitable], 0):
            self._read(w, now)
        w.process.join()
        for number, kind, blob in _journal_answers(w.journal):
            if number >= w.received:  # finished and written down, never sent
                w.received += 1
                self._take_one(w, kind, blob, now)
        if not _PORTABLE:
            self._selector.unregister(w.sentinel)
        if not w.eof:
            self._selector.unregister(w.link.waitable)
        w.close()
        self.workers.remove(w)
        self._missing += 1
        code = w.process.exitcode
        jobs = [j for j in w.jobs if j.start < j.stop]
        began = _U64.unpack_from(w.journal.buffer, 8)[0] > w.sent - len(w.msgs)
        if jobs and not began:
            # It died before reading the message of the task at the head (killed while idle,
            # say): none of these tasks began.
            self.pending.extendleft(reversed(jobs))
        elif w.overdue is not None and jobs and (jobs[0].owner, jobs[0].start) != w.overdue:
            # The overdue task finished as it was stopped; the next one had barely begun.
            self.pending.extendleft(reversed(jobs))
        elif jobs:
            owner, slot = jobs[0].owner, jobs[0].start
            task = owner.task(slot)
            if w.overdue is not None:
                failure = _Failure.of(TimeoutError(f"{_short(task)} did not finish within "
                                                   f"{owner.timeout} s; its worker process was stopped"))
            else:
                died = (f"the worker process (pid {w.process.pid}) running {_short(task)} "
                        f"{_exit_reason(code)}")
                # Its text reads as in mplite 1.x; exception mode raises the richer class.
                failure = _Failure(_describe(ChildProcessError(died))[0], exc=WorkerDiedError(died))
            jobs[0].start += 1
            self.pending.extendleft(reversed([j for j in jobs if j.start < j.stop]))  # never started
            self._finish(owner, slot, False, failure)
        elif not w.ready:
            # It died while starting. Killed from outside: start another, within reason.
            # Exited by itself: it will again (say, the main module fails to import).
            self._boot_deaths += 1
            if (code is not None and code >= 0) or self._boot_deaths > _BOOT_DEATHS:
                raise BrokenProcessPool(f"a worker process {_exit_reason(code)} before it was "
                                        f"ready; see its output above")

    def _enforce_timeouts(self, now):
        """Kill the workers whose task is past its timeout; seconds to the next deadline, or None."""
        soonest = None
        for w in self.workers:
            deadline = _deadline(w)
            if deadline is None:
                continue
            if now >= deadline:
                w.overdue = (w.jobs[0].owner, w.jobs[0].start)
                w.open = False
                w.process.kill()  # _reap gives the task its TimeoutError
            elif soonest is None or deadline < soonest:
                soonest = deadline
        return None if soonest is None else soonest - now

    def _stop_workers(self, grace):
        """Ask the workers to exit; after `grace` seconds, terminate the rest. Reap them all."""
        for w in self.workers:
            if not w.ready:  # still starting: it holds no work, so don't wait for it
                w.process.terminate()
                continue
            try:
                w.send(b"")
            except OSError:
                pass
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
        self.workers.clear()


class _Pool(_Scheduling, _Answers, _Faults):
    """The engine: worker processes, the jobs waiting for them, and the thread that runs it all.

    Callers (any thread) use start(), wait_ready(), put() and close(); everything
    else runs on the engine thread, in the three parts above.
    """

    def __init__(self, ctx, size, init, max_tasks, init_label, drain_at_exit=False):
        if ctx is not None and _MAX_WORKERS is not None and size > _MAX_WORKERS:
            raise ValueError(f"at most {_MAX_WORKERS} workers on this system, not {size}")
        self.ctx = ctx
        self.size = size
        self.init = init
        self.init_label = init_label  # what errors call init: "worker_init" or "initializer"
        self.max_tasks = max_tasks
        self.drain_at_exit = drain_at_exit  # finish the queued work at interpreter exit (executor)
        self.inbox = _Inbox()
        self.ready = threading.Event()  # every worker is ready, or the pool broke first
        self.failure = None             # why the pool broke by itself (a BrokenProcessPool)
        self.closed = False             # it takes no more requests
        # Shared between callers and the engine thread, under _lock:
        self._lock = threading.Lock()
        self._requests = deque()  # jobs and commands, for the engine thread
        self._closing = None      # (grace, drain) once close() was asked for
        self._asleep = False      # the engine is (about to be) waiting: wake it for a request
        # The engine thread's own:
        self.workers = []
        self.pending = deque()   # jobs waiting for a worker
        self.parked = None       # (jobs, count, message): too large to prefetch, waits for an idle worker
        self.avg = None          # smoothed seconds per task, as the workers measure it
        self._missing = 0        # workers to start: replacements of those that ended
        self._arrivals = 0       # jobs handed over so far: see _Worker.holds
        self.fork = ctx is not None and ctx.get_start_method() == "fork"
        self.forked_main = None  # fork: the classes of __main__ the workers inherit (see _pickle)
        self._boot_deaths = 0

    # -- what callers use, from any thread -------------------------------------------------------

    def start(self):
        """Start the workers and the engine thread. Returns at once, not waiting for the workers
        to be ready: see wait_ready().

        The workers are started here, in the caller's thread, not by the engine: a spawned
        worker learns the main script's path from __main__.__file__, which Python deletes once
        the script is done, so workers started later (say, at exit) could not import it.
        """
        self.pid = os.getpid()
        _live_pools.add(self)
        _main_file()  # remember it while the script runs
        if self.fork:
            main = vars(sys.modules["__main__"])
            self.forked_main = weakref.WeakValueDictionary({k: v for k, v in main.items() if isinstance(v, type)})
        self._init = None  # what the workers get of init: see _worker_main
        if self.init is not None:
            init = self.init
            try:  # pickled like a task, to run in the same namespace as the tasks
                self._init = _pickle_task(init, self.forked_main)
            except UnpicklableTaskError:  # say which init can't travel, before starting anything
                if not self.fork:
                    raise
                self._init = (init.f, init.args, init.kwargs)  # a forked worker inherits it
        self._lifeline, self._lifeline_end = self.ctx.Pipe(duplex=False)
        self._open_wake_up()
        try:
            for _ in range(self.size):
                self._spawn()
        except BaseException:
            self._stop_workers(0)
            self._close_files()
            raise
        self._start_engine()

    def _open_wake_up(self):
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector = _Selector()  # what the engine sleeps on: see _turn
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _start_engine(self):
        atexit.register(self._at_exit)
        self.thread = threading.Thread(target=self._run, name="mplite-engine", daemon=True)
        # The engine never takes a Ctrl-C: the kernel gives a process's SIGINT to any thread that
        # doesn't block it, and one taken here would not wake the main thread where it waits
        # for results (a lock's wait is cut short only by a signal to its own thread).
        with _sigint_blocked():
            self.thread.start()

    def wait_ready(self):
        """Wait until every worker is ready; raise why if the pool broke first (worker_init)."""
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def payload(self, task):
        """A submit()ted task as it travels, pickled now: it fails here, naming the task, if it can't."""
        return _pickle_task(task, self.forked_main)

    def put(self, request):
        """Hand the engine a _Job to run, or a command (a callable) to run on its thread."""
        with self._lock:
            if self.closed:
                raise self.refusal()
            self._requests.append(request)
        if self._asleep:
            self._wake()

    def drop(self, calls):
        """Drop calls nobody waits for any more (an imap() left early): their queued tasks go,
        results of those already sent are ignored."""
        try:
            self.put(functools.partial(self._drop, list(calls)))
        except RuntimeError:  # the pool has stopped: nothing is left to drop
            pass

    def _drop(self, calls):
        for call in calls:
            call.cancelled = True
            self._forget(call)

    def refusal(self):
        """The error for a request that comes after the pool closed."""
        if self.failure is not None:
            return BrokenProcessPool(f"the pool is broken: {self.failure}")
        return RuntimeError("the pool has been stopped: no more tasks can be submitted")

    def close(self, grace=0.2, drain=False, wait=True):
        """Stop the pool: at once, or (drain) once the work already handed over is done.

        The workers get `grace` seconds to exit before they are terminated. wait: return once
        all that is done. A close at once overrides a draining one asked for before.
        """
        if os.getpid() != self.pid:  # a fork of the parent doesn't own the pool
            return
        with self._lock:
            if self._closing is None or (self._closing[1] and not drain):
                self._closing = (grace, drain)
        self._wake()
        if wait and threading.current_thread() is not self.thread:
            self.thread.join()

    def _at_exit(self):
        # An executor finishes what it was given, as the standard library's does; not after a
        # Ctrl-C ended the program, nor for a TaskManager, which stops at once.
        interrupted = getattr(sys, "last_type", None) is KeyboardInterrupt
        self.close(drain=self.drain_at_exit and not interrupted)

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:  # its buffer is full (the engine will wake anyway), or it is closed
            pass

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self):
        error = None
        try:
            while self._turn():
                pass
        except BrokenProcessPool as exc:
            error = exc
        except BaseException as exc:  # a bug of ours: fail every caller, rather than hang one
            error = BrokenProcessPool(f"mplite's engine failed:\n{_describe(exc)[0]}")
        self._shut_down(error)

    def _turn(self):
        """One round of the engine loop; False once the pool is to close."""
        self._take_requests()
        closing = self._closing
        if closing is not None and (not closing[1] or self._idle()):
            return False
        self._dispatch()
        wait_for = self._enforce_timeouts(monotonic())
        self._asleep = True
        if self._requests or self._closing is not closing:  # came in since: no sleep
            wait_for = 0
        ready = self._selector.select(wait_for)
        self._asleep = False
        now = monotonic()
        for key, _ in ready:
            w = key.data
            if w is None:
                self._drain_wake_ups()
            elif w not in self.workers:
                continue  # reaped already in this round
            elif key.fileobj == w.sentinel:
                self._reap(w, now)
            else:
                self._read(w, now)
        return True

    def _take_requests(self):
        requests = self._requests
        while requests:
            request = requests.popleft()
            if request.__class__ is not _Job:
                request()  # a command
                continue
            if getattr(request.owner, "fresh", False):
                self.avg = None  # a new call may bring tasks of another size: measure afresh
            self._arrivals += 1
            self.pending.append(request)

    def _drain_wake_ups(self):
        try:
            while len(self._wake_r.recv(4096)) == 4096:
                pass
        except OSError:  # nothing more to read
            pass

    def _idle(self):
        return not (self.pending or self.parked or self._requests or any(w.jobs for w in self.workers))

    def _shut_down(self, error):
        """Tell every waiting caller the pool is gone, then stop the workers (engine thread)."""
        with self._lock:
            self.closed = True
            self.failure = error
            requests, self._requests = self._requests, deque()
        atexit.unregister(self._at_exit)
        if error is None:
            error = RuntimeError("the pool was stopped before this work was done")
        jobs = [r for r in requests if r.__class__ is _Job] + list(self.pending) + self._held_jobs()
        for owner in {id(j.owner): j.owner for j in jobs}.values():
            owner.stopped(error)
        self.inbox.close(error)
        self.pending.clear()
        self.parked = None
        self.ready.set()
        self._stop_workers(self._closing[0] if self._closing else 0)
        self._close_files()

    def _held_jobs(self):
        """The jobs taken off the queue and not finished: parked, or held by workers."""
        jobs = list(self.parked[0]) if self.parked else []
        for w in self.workers:
            jobs += w.jobs
        return jobs

    def _close_files(self):
        for f in (self._lifeline, self._lifeline_end, self._selector, self._wake_r, self._wake_w):
            f.close()


def _deadline(w):
    """When the task w is running must be done by, or None. A timeout counts from the task's
    start: while the worker unpickles its message (which may import modules for a while,
    more on a busy machine), only a generous limit applies."""
    if w.jobs and w.ready and w.overdue is None and w.jobs[0].owner.timeout is not None:
        begun = w.begun > w.sent - len(w.msgs)  # the message at the head is number sent - len(msgs) + 1
        return w.since + w.jobs[0].owner.timeout + (0 if begun else _UNPICKLE_SECONDS)
    return None


def _pop_head(jobs):
    """(owner, slot) of the first task of a worker's queue, which leaves the queue."""
    job = jobs[0]
    slot = job.start
    job.start += 1
    if job.start == job.stop:
        jobs.popleft()
    return job.owner, slot


@contextlib.contextmanager
def _main_path_for_workers(fork):
    """Start a worker that runs the main script again only if there is one. spawn (and a
    forkserver, which starts inside the first Process.start()) run it in the worker from
    __main__.__file__: `python -` sets that to '<stdin>', and the worker would fail to start
    (functions from such a __main__ travel by value anyway); and once the script is done,
    Python deletes it, while an executor may still start workers to finish its work."""
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


def _exit_fd(process):
    """A file descriptor that becomes readable when the process ends. A pidfd where the system
    has them: the process's sentinel pipe stays open in any child a task forks, and would hide
    the worker's death until that child ends."""
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.sentinel


_live_pools = weakref.WeakSet()


def _close_lifelines():
    """In a fork of the parent (its own, or a worker), let go of the parent's end of each
    lifeline: the workers see the parent's death only once every copy of that end is closed."""
    for pool in list(_live_pools):
        end = getattr(pool, "_lifeline_end", None)
        if end is not None and not end.closed:
            end.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lifelines)


def _wait_for_exit(processes, seconds):
    """Wait up to `seconds` for the processes to end; return those still alive."""
    deadline = monotonic() + seconds
    alive = [p for p in processes if p.exitcode is None]
    while alive:
        left = deadline - monotonic()
        if left <= 0:
            break
        wait([p.sentinel for p in alive], left)
        alive = [p for p in alive if p.exitcode is None]
    return alive


# ---------------------------------------------------------------------------------------------
# Workers elsewhere: TaskManager(executor=...) on any concurrent.futures executor
#
# The same engine and the same owners, with submissions to an executor (dask's
# client.get_executor(), say) in place of worker processes. The engine thread still owns every
# record: `sent` says which submission holds which task; a future's callback only hands its
# outcome back as a command. What differs, and why:
#
#   - A submission is one call of _run_remote(token, runs), many tasks at once: an executor
#     costs milliseconds a submission (dask 3-6 ms), so tasks travel in batches of about
#     _REMOTE_BATCH_SECONDS of measured work, one at a time while unmeasured or when long.
#     Arguments are positional only (dask keeps some keywords, `key` or `pure`, for itself),
#     and the token makes each submission unique (dask runs identical "pure" calls once).
#   - A task's outcome is made where it ran: its result, or its traceback as text with the
#     exception pickled, so it survives any serializer.
#   - When the executor fails a whole submission (a worker died: dask's KilledWorker, a
#     BrokenProcessPool), its tasks become suspects: they run again one at a time with nothing
#     else of this manager in flight, and a task is blamed only when it fails alone. So a task
#     may run more than once there (dask itself also reruns work of a dead worker).
#   - A timeout can't stop a remote task. The task gets its TimeoutError at the deadline, and
#     its submission keeps its place in flight until the executor is done with it: tasks with
#     a timeout go one per submission, at most one per worker, so none waits behind a stuck
#     one and times out for its sake.
#   - Before the first submission of a module's function, a probe checks that the executor's
#     workers can import it (and mplite): bytes that unpickle there as the module's name,
#     standard-library code only. dask hangs on a task it can't unpickle; this fails clearly.
#   - A future is let go as soon as its outcome is in: dask recomputes the results it still
#     holds when their worker dies.
# ---------------------------------------------------------------------------------------------

_REMOTE_BATCH_SECONDS = 0.3  # dask: batches of 0.1 s lost 15 % of W2 (40 x 50 ms) to its overhead; 0.3 s, 3 %
_REMOTE_MAX_BATCH = 100_000
_submissions = itertools.count(1)
_NONCE = os.urandom(8).hex()  # with the pid and a count: unique to each submission anywhere


def _run_remote(token, runs):
    """A submission's tasks, run wherever the executor runs it: (results, {index: failure},
    seconds). token: what makes the submission unique, unused here."""
    started = monotonic()
    results, failures = [], {}
    for i, entry in enumerate(_calls(runs)):
        try:
            f, args, kwargs = pickle.loads(entry) if entry.__class__ is bytes else entry
            results.append(f(*args, **kwargs))
        except BaseException as exc:  # SystemExit too: it ends the task, not the executor's worker
            results.append(None)
            failures[i] = _describe(exc)
    return results, failures, monotonic() - started


def _import_probe(name):
    """Bytes that unpickle, anywhere, as `name` once that module is imported."""
    class Module:
        def __reduce__(self):
            return importlib.import_module, (name,)

    class Name:
        def __reduce__(self):
            return getattr, (Module(), "__name__")

    return pickle.dumps(Name(), 2)


class _Sent:
    """One submission to an executor: its future, the jobs it holds, when it must end."""
    __slots__ = ("jobs", "count", "deadline", "alone", "abandoned")

    def __init__(self, jobs, count, deadline, alone):
        self.jobs = jobs
        self.count = count
        self.deadline = deadline
        self.alone = alone       # a suspect, run on its own: a failure is its own
        self.abandoned = False   # past its deadline: its task has its TimeoutError


class _ExecutorPool(_Pool):
    """The engine with an executor's workers in place of its own (see above). size: how many
    submissions may run at once (twice that are in flight, so that none waits for the next)."""

    def __init__(self, executor, size):
        super().__init__(None, size, None, None, init_label=None)
        self.executor = executor
        self.sent = {}            # future -> _Sent: the submissions in flight
        self.suspects = deque()   # one-task jobs of submissions the executor failed
        self.probes = {}          # module -> True (importable there), None (probing), ImportError

    def start(self):
        self.pid = os.getpid()
        self._open_wake_up()
        self.ready.set()
        self._start_engine()

    def payload(self, task):
        _check_functions([task], None)  # the executor pickles it, as it does
        return None

    # -- scheduling ------------------------------------------------------------------------------

    def _dispatch(self):
        while self.suspects or self.pending:
            if self.suspects:
                if self._running():
                    return  # nothing else of ours may run beside a suspect
                self._submit([self.suspects.popleft()], alone=True)
                continue
            timed = self.pending[0].owner.timeout is not None
            if len(self.sent) >= (self.size if timed else 2 * self.size):
                return
            jobs = self._next_batch(1 if timed else self._tasks_for(_REMOTE_BATCH_SECONDS, _REMOTE_MAX_BATCH))
            for i, job in enumerate(jobs):
                if i and job.owner.timeout is not None:  # a task with a timeout travels alone
                    self.pending.extendleft(reversed(jobs[i:]))
                    del jobs[i:]
                    break
            jobs = self._importable_there(jobs)
            if jobs is None:
                return  # probing: the jobs are back in the queue
            if jobs:
                self._submit(jobs, alone=False)

    def _submit(self, jobs, alone):
        try:
            runs = [self._remote_run(job) for job in jobs]
        except _TASK_ERRORS as exc:  # a task whose arguments can't be pickled by value
            if not alone:
                return self._failed(jobs, False, exc)  # find which, one by one
            job = jobs[0]
            return self._refuse(job.owner, job.start, job.stop, UnpicklableTaskError(
                f"{_short(job.owner.task(job.start))} can't be sent to the executor: it can't be pickled: {exc}"))
        token = (_NONCE, os.getpid(), next(_submissions))
        try:
            future = self.executor.submit(_run_remote, token, runs)
        except (RuntimeError, futures.BrokenExecutor) as exc:  # shut down, or broken for good
            self.pending.extendleft(reversed(jobs))
            raise BrokenProcessPool(f"the executor refused work: {exc!r}") from exc
        except Exception as exc:  # it can't take these (it pickles them now, say)
            return self._failed(jobs, alone, exc)
        timeout = jobs[0].owner.timeout if len(jobs) == 1 and jobs[0].stop - jobs[0].start == 1 else None
        self.sent[future] = _Sent(jobs, sum(j.stop - j.start for j in jobs),
                                  None if timeout is None else monotonic() + timeout, alone)
        future.add_done_callback(self._landed_later)

    def _remote_run(self, job):
        """A job's run for _run_remote: functions the executor's workers can't import by name
        (lambdas, notebook functions) travel pickled by mplite, by value."""
        f, star, items = job.owner.run(job.start, job.stop)
        if f is None:
            return None, False, [_pickle(entry) if _by_value(entry[0]) else entry for entry in items]
        return (_pickle(f) if _by_value(f) else f), star, items

    # -- the import probe ------------------------------------------------------------------------

    def _importable_there(self, jobs):
        """The jobs whose modules the executor's workers can import; None while that is being
        found out (the jobs are queued again). Jobs of a module they can't import fail."""
        ready = []
        for job in jobs:
            states = [self._probe(name) for name in self._modules(job)]
            error = next((state for state in states if isinstance(state, ImportError)), None)
            if error is not None:
                self._refuse(job.owner, job.start, job.stop, error)
            elif None in states:  # all of them wait, in order
                self.pending.extendleft(reversed(ready + jobs[jobs.index(job):]))
                return None
            else:
                ready.append(job)
        return ready

    def _modules(self, job):
        """The modules the executor's workers must import to run the job: this one, and those
        of its functions (unless they travel by value with a namespace of their own)."""
        owner = job.owner
        f = getattr(owner, "f", None)
        functions = [f] if f is not None else [owner.task(slot).func for slot in range(job.start, job.stop)]
        names = {__name__}
        for g in functions:
            name = getattr(g, "__module__", None)
            module = sys.modules.get(name)
            if name not in ("__main__", "builtins") and module is not None and _importable(name, module):
                names.add(name)
        return names

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
        future.add_done_callback(lambda future: self._later(self._probed, name, future))
        return None

    def _probed(self, name, future):
        error = None if future.cancelled() else future.exception()
        if isinstance(error, ImportError):
            where = f"client.upload_file({getattr(sys.modules.get(name), '__file__', None) or '<its file>'!r})"
            self.probes[name] = ImportError(
                f"the executor's workers can't import the module {name!r}: {error}. Make it importable "
                f"there: install it on every worker, or with dask, {where}", name=name)
        else:
            self.probes[name] = True  # imported (or another error, which the tasks will meet)

    # -- outcomes --------------------------------------------------------------------------------

    def _landed_later(self, future):
        self._later(self._landed, future)

    def _later(self, command, *args):
        """From an executor's thread: have the engine thread run command(*args)."""
        try:
            self.put(functools.partial(command, *args))
        except RuntimeError:  # the pool has stopped: nobody waits for it
            pass

    def _landed(self, future):
        sent = self.sent.pop(future, None)
        if sent is None or sent.abandoned:
            return  # stopped meanwhile, or past its deadline: its task has its error
        error = futures.CancelledError() if future.cancelled() else future.exception()
        if error is None:
            outcome = future.result()
            del future
            try:
                results, failures, spent = outcome
                if len(results) != sent.count:
                    raise ValueError(f"{len(results)} results for {sent.count} tasks")
            except (TypeError, ValueError) as exc:  # an executor that runs calls its own way
                error = TypeError(f"the executor returned {reprlib.repr(outcome)} for a batch: {exc}")
            else:
                per_task = spent / sent.count
                self.avg = per_task if self.avg is None else self.avg + 0.3 * (per_task - self.avg)
                return self._deliver_outcomes(sent.jobs, results, failures)
        self._failed(sent.jobs, sent.alone, error)

    def _failed(self, jobs, alone, error):
        """The executor failed a submission: blame its task if it ran alone, else find which."""
        if alone:
            job = jobs[0]
            died = (f"{_short(job.owner.task(job.start))} failed on the executor, which gave: "
                    f"{type(error).__name__}: {_clip(str(error), 400)}")
            failure = _Failure.of(WorkerDiedError(died))
            failure.exc.__cause__ = error  # raised in exception mode: the executor's own error
            self._finish(job.owner, job.start, False, failure)
        else:
            for job in jobs:  # run each alone, to find which one it was
                self.suspects.extend(_Job(job.owner, slot, slot + 1) for slot in range(job.start, job.stop))

    def _deliver_outcomes(self, jobs, results, failures):
        i = 0
        for job in jobs:
            owner, n = job.owner, job.stop - job.start
            if owner.plain and not failures:
                owner.deliver_results(job.start, results[i:i + n])
            else:
                for k in range(n):
                    failure = failures.get(i + k)
                    if failure is None:
                        self._finish(owner, job.start + k, True, results[i + k])
                    else:
                        self._finish(owner, job.start + k, False, _Failure(*failure))
            i += n

    # -- faults, and the end ---------------------------------------------------------------------

    def _enforce_timeouts(self, now):
        soonest = None
        for sent in self.sent.values():
            if sent.deadline is None or sent.abandoned:
                continue
            if now >= sent.deadline:
                sent.abandoned = True
                job = sent.jobs[0]
                self._finish(job.owner, job.start, False, _Failure.of(TimeoutError(
                    f"{_short(job.owner.task(job.start))} did not finish within {job.owner.timeout} s "
                    f"(it may still be running on the executor, which can't stop it)")))
            elif soonest is None or sent.deadline < soonest:
                soonest = sent.deadline
        return None if soonest is None else soonest - now

    def _forget(self, owner):
        super()._forget(owner)
        self.suspects = deque(j for j in self.suspects if j.owner is not owner)

    def _idle(self):
        return not (self.pending or self.suspects or self._requests or self._running())

    def _held_jobs(self):
        return list(self.suspects) + [job for sent in self._running() for job in sent.jobs]

    def _running(self):
        """The submissions in flight whose tasks still wait for their outcome (not past a deadline)."""
        return [sent for sent in self.sent.values() if not sent.abandoned]

    def _stop_workers(self, grace):
        """The executor is the user's, and goes on: only this manager's submissions are cancelled."""
        for future in self.sent:
            future.cancel()
        self.sent.clear()

    def _close_files(self):
        for f in (self._selector, self._wake_r, self._wake_w):
            f.close()


def _by_value(f):
    """Must f travel by value to an executor's workers? Only a function they can't import."""
    return type(f) is types.FunctionType and not _by_name(f)


def _executor_slots(executor):
    """How many tasks an executor runs at once: its max_workers, or a dask client's threads."""
    n = getattr(executor, "_max_workers", None)
    if isinstance(n, int) and n > 0:
        return n
    try:  # dask's ClientExecutor: its client knows its cluster (mplite never imports dask)
        return max(1, sum(executor._client.nthreads().values()))
    except Exception:
        return _usable_cpus()


# ---------------------------------------------------------------------------------------------
# Functions that travel by value
#
# pickle sends a function by name: the worker imports its module and looks it up. That fails
# for a lambda, a nested function, and anything typed into a notebook, a REPL, `python -c` or
# `python -` (the workers can't import that __main__). Such a function travels by value
# instead: its code (marshal: parent and workers run the same interpreter), its closure cells,
# defaults and the globals its code really uses. Functions from one namespace share one
# globals dict in each worker, as a module's functions share the module. A function the
# workers can import still travels by name, exactly as before.
# ---------------------------------------------------------------------------------------------

_CURE = ("move it into a .py module next to your notebook or script and import it from there, "
         "or use context='fork' where available")
# The opcodes that name a global. Attribute names (x.tm) are in co_names too, under LOAD_ATTR
# and STORE_ATTR: they must not drag a global of the same name along.
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME",
                         "LOAD_FROM_DICT_OR_GLOBALS"})
_WRITE_OPS = frozenset({"STORE_GLOBAL", "DELETE_GLOBAL"})
_MISSING = object()


def _pickle(obj, forked_main=None, sent=None):
    """obj pickled for a worker: by name where the workers can import it, else by value.

    The fast path is multiprocessing's own pickler; the by-value one runs when that fails (a
    lambda) or when the workers can't import __main__ (a notebook), where names mislead.
    forked_main: for a fork pool, {name: class} of the __main__ its workers were forked with:
    those classes may go by name even where __main__ is no file. sent: see _ByValuePickler.
    Raises pickle.PicklingError saying what can't travel and why.
    """
    out = io.BytesIO()
    if _importable("__main__", sys.modules["__main__"]):
        try:
            _ByNamePickler(out, pickle.HIGHEST_PROTOCOL).dump(obj)
            return out.getvalue()
        except _TASK_ERRORS:  # _ByValueNeeded too
            out = io.BytesIO()
    pickler = _ByValuePickler(out, forked_main, sent)
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


class _ByValueNeeded(Exception):
    pass


class _ByNamePickler(ForkingPickler):
    """multiprocessing's pickler, which sends functions by name; it gives up (for the by-value
    one) on a function of the main script that its workers won't have: one defined inside
    `if __name__ == "__main__":`, a block that a spawned worker running the script skips."""

    def reducer_override(self, obj):  # not called for ints, strs, tuples, lists, dicts...
        if type(obj) is types.FunctionType and obj.__module__ == "__main__" and _under_main_guard(obj):
            raise _ByValueNeeded
        return NotImplemented


def _under_main_guard(f):
    line, path = f.__code__.co_firstlineno, _main_file()
    first = _first_top_level_if(path)
    if first is None or line < first:  # the usual case: no need to parse the script
        return False
    return any(start <= line <= end for start, end in _main_guards(path))


@functools.lru_cache(maxsize=4)
def _first_top_level_if(path):
    """The line of the main script's first top-level `if`, or None: a quick scan (parsing a
    long script takes tens of milliseconds, the first time a pool sends one of its functions)."""
    try:
        with open(path, "rb") as source:
            for number, text in enumerate(source, 1):
                if text.startswith((b"if ", b"if(", b"if\t")):
                    return number
    except (OSError, TypeError, ValueError):  # no script (None), or none to read
        pass
    return None


@functools.lru_cache(maxsize=4)
def _main_guards(path):
    """(first, last) line of each top-level `if __name__ == ...:` block of the main script."""
    import ast  # here, not at the top: workers never need it, and each worker imports mplite
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
    except (OSError, TypeError, ValueError, SyntaxError):  # no script (None), or none to read
        return ()
    return tuple((node.lineno, node.end_lineno) for node in tree.body
                 if isinstance(node, ast.If) and "__name__" in ast.dump(node.test))


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


_is_file = functools.lru_cache(maxsize=8)(os.path.isfile)  # one stat per script, not per batch
_main_script = {}  # id of a __main__ module -> (that module, its file): see _main_file


def _main_file():
    """The main script's path, if it is a file. Remembered: Python deletes __main__.__file__
    once the script is done, and an executor still sends the work it was given after that."""
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if path is not None:
        _main_script[id(main)] = (main, path if _is_file(path) else None)
    return _main_script.get(id(main), (None, None))[1]


def _by_name(obj):
    """Can a worker find this function or class by its module and qualified name? Not cached:
    a notebook cell run again makes a new function under the old name, which must then go by value."""
    qualname = obj.__qualname__
    if "<" in qualname:  # <lambda>, <locals>: no attribute path leads there
        return False
    module = sys.modules.get(obj.__module__)
    if module is None or not _importable(obj.__module__, module):
        return False
    for part in qualname.split("."):
        module = getattr(module, part, None)
    return module is obj and not (obj.__module__ == "__main__" and type(obj) is types.FunctionType
                                  and _under_main_guard(obj))


def _stuck_class(cls):
    """A class no worker can import: defined in a function, or in a file-less __main__."""
    return (cls.__module__ == "__main__" or "<locals>" in cls.__qualname__) and not _by_name(cls)


_code_info_cache = {}  # id(code) -> (weakref to code, marshalled, global names, written, co_names)


def _code_info(code):
    """The marshalled code and the names its bytecode uses as globals, nested code included.
    Reading bytecode costs ~100 us: once per code object (lambdas made in a loop share it)."""
    import dis  # as ast in _main_guards
    info = _code_info_cache.get(id(code))
    if info is None or info[0]() is not code:
        names, writes, attrs, todo = set(), set(), set(), [code]
        while todo:
            c = todo.pop()
            attrs.update(c.co_names)
            for ins in dis.get_instructions(c):
                if ins.opname in _GLOBAL_OPS:
                    names.add(ins.argval)
                    if ins.opname in _WRITE_OPS:
                        writes.add(ins.argval)
            todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
        ref = weakref.ref(code, lambda _, key=id(code): _code_info_cache.pop(key, None))
        info = _code_info_cache[id(code)] = (ref, marshal.dumps(code), tuple(names), tuple(writes), attrs)
    return info


def _cells(f):
    """{index: value} of f's closure cells; an empty one (not assigned yet) stays empty."""
    cells = {}
    for i, cell in enumerate(f.__closure__ or ()):
        try:
            cells[i] = cell.cell_contents
        except ValueError:
            pass
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
    """multiprocessing's pickler (its reducers kept), sending what can't go by name by value.

    sent: a record kept per worker of the globals it already holds, {(namespace, name):
    value}; a value sent before (the same object) is not sent again. The engine empties it
    whenever new work arrives, so a global changed between calls reaches the workers.
    """

    def __init__(self, file, forked_main=None, sent=None):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.forked_main = forked_main
        self.sent = sent
        self.fresh = {}     # globals sent by this message, for `sent` once it is done
        self.by_value = []  # functions sent by value, to name the culprit if pickling fails

    def reducer_override(self, obj):  # called once per object (pickle's memo), not for int, str...
        if type(obj) is types.FunctionType:
            return NotImplemented if _by_name(obj) else self._reduce_function(obj)
        if isinstance(obj, type):
            if not _stuck_class(obj):
                return NotImplemented
            forked = self.forked_main
            if forked is not None and obj.__module__ == "__main__" and forked.get(obj.__qualname__) is obj:
                return NotImplemented  # the forked workers have it
            why = ("it was defined after the pool's workers were forked" if forked is not None
                   else "it can't be imported by a worker process")
            raise pickle.PicklingError(f"class {obj.__module__}.{obj.__qualname__}: {why}, so neither it "
                                       f"nor its instances can be sent there: {_CURE}")
        elif isinstance(obj, types.ModuleType):  # modules travel by name (pickle refuses them)
            if sys.modules.get(obj.__name__) is obj and _importable(obj.__name__, obj):
                return importlib.import_module, (obj.__name__,)
            raise pickle.PicklingError(f"module {obj.__name__!r} can't be imported by a worker process: {_CURE}")
        return NotImplemented

    def _reduce_function(self, f):
        _, code, names, writes, attributes_used = _code_info(f.__code__)
        g = f.__globals__
        module = sys.modules.get(f.__module__)
        shared = module is not None and module.__dict__ is g and _importable(f.__module__, module)
        namespace = (f.__module__, os.getpid(), _namespace_number(g), shared)  # see _namespace
        values, modules = {}, []
        for name in names:
            value = g.get(name, _MISSING)  # missing: a builtin, or not defined yet
            if value is not _MISSING and name != "__builtins__":
                values[name] = value
                if isinstance(value, types.ModuleType):
                    modules += _submodules(value, attributes_used)
        if self.sent is not None:
            for name in list(values):
                if self.sent.get((namespace, name), _MISSING) is values[name]:
                    del values[name]  # this worker holds it already
                else:
                    self.fresh[namespace, name] = values[name]
        attrs = {"__qualname__": f.__qualname__}
        for attr in ("__defaults__", "__kwdefaults__", "__doc__", "__dict__"):
            value = getattr(f, attr)
            if value:  # None or empty: the rebuilt function has that already
                attrs[attr] = value
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
    for f in reversed(functions):  # the innermost first: it was being pickled when it failed
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
    return None


_numbered = {}  # parent: id of a globals dict -> (that dict, its number); kept, so no other takes its id


def _namespace_number(g):
    entry = _numbered.get(id(g))
    if entry is None:
        entry = _numbered[id(g)] = (g, next(_ids))
    return entry[1]


# The worker's side: pickle.loads finds _function_skeleton and _function_setstate by name.

_namespaces = {}  # (module, parent pid, namespace number, shared) -> globals dict
_assigned = {}    # id of a notebook's globals dict here -> the names its functions assign


def _namespace(key):
    """The one globals dict of a source namespace in this worker. A module the worker can
    import (a script's __main__ too) lends its own, which its functions sent by name use.
    Functions typed into a notebook share a dict of their own, as a module's functions share
    the module; not the worker's __main__, whose names it would clash with."""
    namespace = _namespaces.get(key)
    if namespace is None:
        name, _, _, shared = key
        namespace = vars(importlib.import_module(name)) if shared else {"__builtins__": builtins, "__name__": name}
        _namespaces[key] = namespace
    return namespace



def _function_skeleton(code, name, key):
    code = marshal.loads(code)
    cells = tuple(types.CellType() for _ in code.co_freevars) or None  # filled by _function_setstate
    return types.FunctionType(code, _namespace(key), name, None, cells)


def _function_setstate(f, state):
    key, values, writes, cells, attrs, _ = state  # the submodules were imported by unpickling them
    namespace = _namespace(key)
    if key[3]:  # a module this worker imported: its values win, as for its functions sent by name
        for name, value in values.items():
            namespace.setdefault(name, value)
    else:
        assigned = _assigned.setdefault(id(namespace), set())
        for name, value in values.items():
            # A name that a function of the notebook assigns (`global model` in a worker_init)
            # belongs to the worker once there: the parent's stale copy (often a `model = None`
            # line) doesn't overwrite it. Other globals take the parent's newest value.
            if name not in assigned or name not in namespace:
                namespace[name] = value
        assigned.update(writes)
    for i, value in cells.items():
        f.__closure__[i].cell_contents = value
    for attr, value in attrs.items():
        setattr(f, attr, value)


# ---------------------------------------------------------------------------------------------
# Errors: what a failed task's result is made of
# ---------------------------------------------------------------------------------------------



class _Failure:
    """A task's error: the text str mode returns, and what exception mode needs to raise it."""
    __slots__ = ("text", "blob", "frames", "exc")

    def __init__(self, text, blob=None, frames=(), exc=None):
        self.text = text
        self.blob = blob      # the pickled exception, when it survived a round trip
        self.frames = frames  # (filename, lineno, name) of the worker's traceback
        self.exc = exc        # the exception itself, for errors made in the parent

    @classmethod
    def of(cls, exc):
        """An error raised on a task's behalf in the parent: a dead worker, a timeout."""
        return cls(_describe(exc)[0], exc=exc)

    def exception(self):
        """The exception to raise in the caller, carrying the worker-side traceback."""
        exc = self.exc
        if exc is None:
            try:
                exc = pickle.loads(self.blob)
            except _TASK_ERRORS:
                last = self.text.rstrip().splitlines()[-1]
                exc = RuntimeError(f"{last} (the task's exception could not be sent back as it is)")
        if self.frames:
            exc = exc.with_traceback(_rebuild_traceback(self.frames))
        return exc


def _describe(exc):
    """(text, pickled exception or None, frames) of an exception: what travels back for it."""
    tb = exc.__traceback__
    tb = tb and tb.tb_next  # the first frame is ours, where the task was called
    text = "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")
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
    """A real traceback object whose frames point at the worker's files, lines and functions.

    For each frame, compile a `raise` placed at the same line of the same file, name its code
    after the function, and run it: the frame it leaves behind is a stand-in for the worker's.
    The `raise` is padded to the length of the real line, so that tracebacks underline nothing.
    """
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
    if chain.next is None:
        return None
    step = chain.next(chain.task, result)
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
    """Refuse a call whose function can't travel, even by value, before any task is sent: that
    is the usual case (tasks: one for each distinct function). Arguments are checked as their
    batches are pickled."""
    for task in tasks:
        try:
            _pickle(task.f, forked_main)
        except _TASK_ERRORS as exc:
            raise UnpicklableTaskError(f"{_short(task)} can't be sent to a worker process: "
                                       f"it can't be pickled: {exc}") from exc


def _pickle_task(task, forked_main=None):
    try:
        return _pickle((task.f, task.args, task.kwargs), forked_main)
    except _TASK_ERRORS as exc:
        raise UnpicklableTaskError(f"{_short(task)} can't be sent to a worker process: "
                                   f"it can't be pickled: {exc}") from exc


def _clip(text, most):
    """text, cut in the middle to at most about `most` characters."""
    return text if len(text) <= most else f"{text[:most // 2]} ... {text[-most // 2:]}"


def _exit_reason(code):
    if code is None:  # reaped by multiprocessing itself, in another thread's active_children()
        return "ended (its exit status was collected elsewhere)"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = " (possibly out of memory)" if -code == signal.SIGKILL else ""
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
    if isinstance(context, BaseContext):
        return context
    if not isinstance(context, str):
        raise TypeError(f"context must be a start method name or a multiprocessing context, not {context!r}")
    methods = get_all_start_methods()
    if context not in methods:
        raise ValueError(f"context must be one of {methods}, not {context!r}")
    return get_context(context)


def _usable_cpus():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return min(os.cpu_count() or 1, _MAX_WORKERS or 1 << 20)


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
    if pbar is not None:
        return pbar
    if not progress:
        return None
    if tqdm is not None:
        return tqdm(total=total, unit="tasks")
    return _ProgressBar(total)


class _ProgressBar:
    """A text bar in tqdm's default look: ` 45%|████▌     | 45/100 [00:02<00:03, 17.30tasks/s]`.

    On a terminal it redraws one line in place, at most 10 times a second. Elsewhere (a CI log,
    a file) it writes whole lines: at the start, then at growing intervals, and at the end.
    """
    _UNICODE = " ▏▎▍▌▋▊▉█"
    _ASCII = " 123456789#"

    def __init__(self, total, file=None, unit="tasks"):
        self.file = file or sys.stderr
        self.total = total
        self.unit = unit
        self.n = 0
        self.start = self.drawn = monotonic()
        self.tty = _isatty(self.file)
        self.width = 0
        self.interval = 0.1 if self.tty else 5.0
        try:
            self._UNICODE.encode(getattr(self.file, "encoding", None) or "ascii")
            self.blocks = self._UNICODE
        except (UnicodeEncodeError, LookupError):
            self.blocks = self._ASCII
        self._draw(self.start)

    def update(self, n=1):
        self.n += n
        now = monotonic()
        if now - self.drawn >= self.interval:
            self._draw(now)
            if not self.tty:
                self.interval = min(2 * self.interval, 60.0)

    def close(self):
        self._draw(monotonic())
        if self.tty:
            self._write("\n")

    def _draw(self, now):
        self.drawn = now
        line = self.format(self.n, self.total, now - self.start)
        if self.tty:  # pad, to cover a longer line drawn before
            line, self.width = "\r" + line.ljust(self.width), max(self.width, len(line))
        else:
            line += "\n"
        self._write(line)

    def _write(self, text):
        try:
            self.file.write(text)
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the work
            pass

    def format(self, n, total, elapsed):
        frac = n / total if total else 1.0
        width, levels = 10, len(self.blocks) - 1
        full, part = divmod(int(frac * width * levels), levels)
        bar = self.blocks[-1] * full
        if full < width:
            bar += self.blocks[part]
        bar = bar.ljust(width)
        rate = n / elapsed if elapsed > 0 and n else None
        if rate is None:
            remaining, speed = "?", f"?{self.unit}/s"
        else:
            remaining = _clock((total - n) / rate)
            speed = f"{rate:5.2f}{self.unit}/s" if rate >= 1 else f"{1 / rate:5.2f}s/{self.unit}"
        return f"{frac * 100:3.0f}%|{bar}| {n}/{total} [{_clock(elapsed)}<{remaining}, {speed}]"


def _clock(seconds):
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _isatty(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Self-test: python -m mplite
# ---------------------------------------------------------------------------------------------

def _showcase_f(*args, **kwargs):
    time.sleep(args[0])
    return args[0] / kwargs["hello"]


def _broken(*args, **kwargs):
    raise NotImplementedError("this task must fail!")


def _adder(a, b):
    return a + b


def _add_one_next(prev_task, result):
    return Task(_adder, result, 1)


def _self_test():
    checks = []

    def check(what, ok, detail=""):
        checks.append(ok)
        print(f"  [{'ok' if ok else 'FAILED'}] {what}" + (f": {detail}" if detail and not ok else ""))

    print(f"mplite {__version__} self-test (Python {sys.version.split()[0]}, {_usable_cpus()} CPUs)")
    start = time.perf_counter()
    with TaskManager() as tm:
        print(f"  started {tm.cpu_count} workers with the 'spawn' start method")
        args = list(range(10)) * 5
        tasks = [Task(_showcase_f, arg / 100, hello=arg) for arg in args]
        results = tm.execute(tasks, progress=False)
        errors = [r for r in results if isinstance(r, str)]
        values = [r for r in results if not isinstance(r, str)]
        check("50 tasks with args and kwargs, results in order",
              len(results) == 50 and all(abs(v - 0.01) < 1e-9 for v in values), repr(results[:3]))
        check("5 tasks dividing by zero return their tracebacks",
              len(errors) == 5 and all(e.startswith("Traceback (most recent call last):")
                                       and e.endswith("ZeroDivisionError: float division by zero") for e in errors),
              repr(errors[:1]))
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
        chain = TaskChain(Task(_adder, 20, 0), _add_one_next)
        check("a task chain runs step after step", tm.execute([chain], progress=False) == [21])
    elapsed = time.perf_counter() - start
    if all(checks):
        print(f"all {len(checks)} checks passed in {elapsed:.1f} s")
        return 0
    print(f"{checks.count(False)} of {len(checks)} checks FAILED")
    return 1


if __name__ == "__main__":
    sys.exit(_self_test())
