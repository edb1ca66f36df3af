"""The `lorafuse` console script: Ctrl-C (or SIGTERM) while the package itself is imported is one line and exit
status 130 (143), as it is once lorafuse.cli.main runs. This module is outside the package so that it can catch
what importing `lorafuse` raises; it imports nothing itself. Python callers use lorafuse.cli.main."""

import sys  # built in and loaded before this module: a Ctrl-C cannot land in it (signal is imported in main)

try:  # a Ctrl-C while this module itself loads (the console script imports it first): one line, status 130
    # The signals the console script has seen (SIGINT, SIGTERM), in order. An import that a Ctrl-C stops inside an
    # extension module can lose the KeyboardInterrupt: numpy's C core, interrupted while it imports `datetime`, raises
    # "ImportError: PyCapsule_Import could not import module datetime" with no KeyboardInterrupt in its chain.
    SEEN: list[int] = []


    class _Terminated(KeyboardInterrupt):
        """SIGTERM during the imports."""


    def _ignores_exceptions(frame: object) -> bool:
        """Whether `frame` runs where Python prints an exception and drops it ("Exception ignored in ...", with a
        traceback): importlib's module-lock weakref callback, a __del__. A signal that lands there is sent again,
        to be raised once that code is done."""
        code = getattr(frame, "f_code", None)
        return code is not None and (code.co_name == "__del__" or (code.co_name == "cb" and
                                                                      "importlib" in code.co_filename))


    def _again(signum: int) -> None:
        import signal

        signal.raise_signal(signum)


    def _on_sigterm(signum: int, frame: object) -> None:
        if _ignores_exceptions(frame):
            return _again(signum)
        SEEN.append(signum)
        raise _Terminated()


    def _on_sigint(signum: int, frame: object) -> None:
        """Python's own Ctrl-C (a KeyboardInterrupt), remembered in SEEN."""
        if _ignores_exceptions(frame):
            return _again(signum)
        SEEN.append(signum)
        raise KeyboardInterrupt


    def interrupted(e: BaseException) -> bool:
        """Whether `e` is, or was raised while handling, a Ctrl-C (an import stopped halfway raises ImportError), or is
        an ImportError after the console script saw SIGINT or SIGTERM (SEEN: an extension module's import that lost
        the KeyboardInterrupt); also lorafuse.cli's test, once the package runs."""
        seen: set[int] = set()
        x: BaseException | None = e
        while x is not None and id(x) not in seen:
            if isinstance(x, KeyboardInterrupt) or (isinstance(x, ImportError) and SEEN):
                return True
            seen.add(id(x))
            x = x.__cause__ or x.__context__
        return False


    OUT_OF_MEMORY = ("lorafuse: error: out of memory while loading lorafuse: the machine, or a limit such as "
                     "ulimit -v, leaves too little; no output was written")


    def out_of_memory(e: BaseException) -> bool:
        """Whether `e`, raised while lorafuse loads, is running out of memory: a MemoryError, or under ulimit -v
        compile's lost one ("SystemError: <built-in function compile> returned NULL without setting an exception");
        other SystemErrors are bugs, shown as they are. Also lorafuse.cli's test, for what it loads later."""
        return isinstance(e, MemoryError) or (isinstance(e, SystemError) and
                                              "without setting an exception" in str(e))


    def _stopped_status(e: BaseException) -> int:
        """The exit status of a stop: 143 for SIGTERM (the last signal seen), else 130 (Ctrl-C)."""
        import signal

        return 143 if isinstance(e, _Terminated) or (bool(SEEN) and SEEN[-1] == signal.SIGTERM) else 130


    def main() -> int:
        SEEN.clear()
        own_int = False
        try:  # a Ctrl-C anywhere before lorafuse.cli.main runs, setting up the handlers too: one line, status 130
            import signal  # here, not at the top: a Ctrl-C while it loads (an enum's conversion) is caught too

            previous = signal.signal(signal.SIGTERM, _on_sigterm)
            try:
                own_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not where Ctrl-C is ignored
                if own_int:
                    signal.signal(signal.SIGINT, _on_sigint)
                from lorafuse.cli import arm_stop_watch
                from lorafuse.cli import main as cli_main
            finally:
                signal.signal(signal.SIGTERM, previous)
        except (KeyboardInterrupt, ImportError) as e:
            if own_int:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            if not interrupted(e):
                raise
            sys.stderr.write("lorafuse: interrupted; no output was written\n")
            return _stopped_status(e)
        except (MemoryError, SystemError) as e:  # under ulimit -v, compiling a module can fail as a SystemError
            if not out_of_memory(e):
                raise
            if own_int:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.stderr.write(OUT_OF_MEMORY + "\n")
            return 1
        try:
            arm_stop_watch()  # this process is the command: a stop that hangs may end it (cli._watch_stop)
            return cli_main()
        except KeyboardInterrupt as e:  # a Ctrl-C in cli.main before its own handlers and words took over (it says
            from lorafuse.io.atomic import COMMITTED  # its own otherwise); loaded with lorafuse.cli

            sys.stderr.write("lorafuse: interrupted\n" if COMMITTED else
                             "lorafuse: interrupted; no output was written\n")
            return _stopped_status(e)
        finally:
            if own_int:
                signal.signal(signal.SIGINT, signal.default_int_handler)


    def run() -> int:
        """The console script's entry: `main`, then the process ends at once where nothing is left to do, skipping
        the interpreter's teardown (freeing every module and object, joining numpy's OpenBLAS threads: 20-30 ms
        after every command, a tenth of a small `apply`). Only when main returned normally and no other thread runs;
        atexit handlers run first, then stdout and stderr are flushed (what a handler prints is kept). Otherwise
        main's status goes back to the script's sys.exit as before. Python callers (and tests) use `main`, which
        always returns."""
        status = main()
        try:
            import threading  # loaded by lorafuse.cli already

            if threading.active_count() == 1:
                import atexit
                import os

                atexit._run_exitfuncs()  # first: what a handler prints (buffered on a pipe) is flushed below
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        except (OSError, ValueError, KeyboardInterrupt):  # a stream that failed or was closed (the interpreter's
            pass  # exit says so, as before), or a Ctrl-C after the command finished: its status stands
        return status
except KeyboardInterrupt:
    sys.stderr.write("lorafuse: interrupted; no output was written\n")
    raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
