"""Run ``mediround ARGS...`` and signal this process just before the COUNT-th ``os.replace`` onto a path
ending with SUFFIX: ``python reliability_kill_driver.py KILL|INT SUFFIX COUNT ARGS...``.

Every final name of every output is made by ``os.replace``, so these are the moments where a kill could
leave a file half-written under its final name if any writer were not atomic.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    mode, suffix, count, *args = sys.argv[1:]
    signum = {"KILL": signal.SIGKILL, "INT": signal.SIGINT}[mode]
    real_replace = os.replace
    seen = 0

    def replace(source, destination, *rest, **keywords):
        nonlocal seen
        if os.fspath(destination).endswith(suffix):
            seen += 1
            if seen == int(count):
                os.kill(os.getpid(), signum)
        return real_replace(source, destination, *rest, **keywords)

    os.replace = replace
    from mediround_cli.main import cli

    cli(args, prog_name="mediround")


if __name__ == "__main__":
    main()
