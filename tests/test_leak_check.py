"""The suite's leak check fails a test that leaves a child process, a non-daemon thread or a listening socket."""

from __future__ import annotations

import pathlib

import pytest

pytest_plugins = ["pytester"]

LEAKS = {
    "process": "import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
    "thread": "import threading, time\n    threading.Thread(target=time.sleep, args=(4,)).start()",
    "socket": "import socket\n    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); LEFT.append(s)",
}


@pytest.mark.parametrize("kind", LEAKS)
def test_a_leaking_test_fails_loudly(pytester, kind, monkeypatch):
    pytester.makeconftest(pathlib.Path(__file__).with_name("conftest.py").read_text())
    monkeypatch.setenv("TIDESERVE_LEAK_GRACE_S", "1")
    pytester.makepyfile(test_leaky=f"LEFT = []\n\ndef test_leaks():\n    {LEAKS[kind]}\n\ndef test_clean():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 2 and outcomes["errors"] >= 1, outcomes
    assert result.ret != 0
    result.stdout.fnmatch_lines([f"*test_leaks left running*{ {'process': 'sleep', 'thread': 'Thread-', 'socket': 'listening ports [[][0-9]'}[kind]}*"])
