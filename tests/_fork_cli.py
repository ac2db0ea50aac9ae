"""``python -m trainer ARGS`` as a fresh process each time, without paying for the imports each time.

A server process imports torch, Lightning and the trainer once; for every command it forks a child that
redirects stdout and stderr to files and runs ``trainer/__main__.py`` exactly as ``python -m trainer`` does,
then reports the child's exit status. Each command still runs in its own process, with its own exit code,
stderr and file system effects; only the interpreter start-up and the imports are shared.
Set ``HANDGRAD_TEST_SUBPROCESS=1`` to run every command as a plain ``[sys.executable, "-m", "trainer"]``.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from _util import ROOT

SERVER = r"""
import json, os, runpy, sys, traceback
import trainer.cli  # noqa: F401  the slow imports, once

def child(request):
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, key in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["trainer", *request["args"]]
    try:
        runpy.run_module("trainer", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:  # what the interpreter does with it
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(request)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HANDGRAD_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return env


class Running:
    """A command the server has started: a small part of ``subprocess.Popen`` (pid, poll, signals, wait)."""

    def __init__(self, server: ForkingCLI, pid: int, stdout: Path, stderr: Path) -> None:
        self.server, self.pid, self._out, self._err = server, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.server._readable(0):
            self.returncode = self.server._read()["rc"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> Result:
        if self.returncode is None:
            if not self.server._readable(timeout if timeout is not None else self.server.timeout):
                os.kill(self.pid, 9)
                self.server._read()
                raise TimeoutError(f"pid {self.pid} did not finish in {timeout} s")
            self.returncode = self.server._read()["rc"]
        return Result(self.returncode, self._out.read_text(), self._err.read_text())


class ForkingCLI:
    """Call it like ``run_cli``: ``cli("fit", "--config", ..., env={...})`` → ``Result``; or ``start`` one
    and get a ``Running`` to signal. One command at a time."""

    def __init__(self, scratch: Path, timeout: float = 600) -> None:
        self.scratch, self.timeout, self.count = scratch, timeout, 0
        self.plain = os.environ.get("HANDGRAD_TEST_SUBPROCESS", "") == "1"
        self.proc = None
        if not self.plain:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVER],
                cwd=ROOT,
                env=_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def _readable(self, timeout: float) -> bool:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            return bool(sel.select(timeout))

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the command server died")
        return json.loads(line)

    def start(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Running | subprocess.Popen:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        if self.plain:
            with open(out, "w") as o, open(err, "w") as e:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "trainer", *args], cwd=cwd, env={**_env(), **(env or {})}, stdout=o, stderr=e
                )
            return _PlainRunning(proc, out, err)
        request = {"args": list(args), "env": env or {}, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Running(self, self._read()["pid"], out, err)

    def __call__(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Result:
        return self.start(*args, env=env, cwd=cwd).wait(self.timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _PlainRunning:
    """``Running`` for a plain subprocess (``HANDGRAD_TEST_SUBPROCESS=1``)."""

    def __init__(self, proc: subprocess.Popen, stdout: Path, stderr: Path) -> None:
        self.proc, self.pid, self._out, self._err = proc, proc.pid, stdout, stderr

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> Result:
        self.proc.wait(timeout)
        return Result(self.proc.returncode, self._out.read_text(), self._err.read_text())
