"""The `lorafuse` console script: Ctrl-C (or SIGTERM) while the package itself is imported is one line and exit
status 130 (143), as it is once lorafuse.cli.main runs. This module is outside the package so that it can catch
what importing `lorafuse` raises; it imports nothing itself. Python callers use lorafuse.cli.main."""

import signal
import sys


class _Terminated(KeyboardInterrupt):
    """SIGTERM during the imports."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def interrupted(e: BaseException) -> bool:
    """Whether `e` is, or was raised while handling, a Ctrl-C (an import stopped halfway raises ImportError); also
    lorafuse.cli's test, once the package runs."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        if isinstance(x, KeyboardInterrupt):
            return True
        seen.add(id(x))
        x = x.__cause__ or x.__context__
    return False


def main() -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from lorafuse.cli import main as cli_main
    except (KeyboardInterrupt, ImportError) as e:
        if not interrupted(e):
            raise
        sys.stderr.write("lorafuse: interrupted; no output was written\n")
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return cli_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
