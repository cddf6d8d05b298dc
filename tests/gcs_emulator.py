"""The gs:// tests' side of the GCS emulator (tools/gcs_emulator.py): the pytest fixture `gcs`, and the strace
helpers that let a test assert that a CLI connected to nothing but 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tools.gcs_emulator import GcsEmulator
from tools.gcs_proxy import HOSTS as HOSTS_SERVED

__all__ = ["GcsEmulator", "HOSTS_SERVED", "connect_targets", "gcs", "traced"]

_CONNECT = re.compile(r'connect\(\d+, \{sa_family=(AF_INET6?), sin6?_port=htons\((\d+)\), '
                      r'(?:sin_addr=inet_addr\("([^"]+)"\)|sin6_flowinfo=[^,]*, inet_pton\(AF_INET6, "([^"]+)")')


def traced(cmd: list[str], log: str) -> list[str]:
    """`cmd` run under strace, recording every connect() of the process and its children in `log`."""
    if shutil.which("strace") is None:
        raise RuntimeError("the loopback-only check needs strace (apt-get install strace)")
    return ["strace", "-f", "-qq", "-e", "trace=connect", "-e", "signal=none", "-o", log] + cmd


def connect_targets(log: str) -> set[str]:
    """The IP addresses that the traced processes tried to connect to (AF_INET and AF_INET6), the name
    server's included."""
    with open(log, encoding="utf-8") as f:
        return {m.group(3) or m.group(4) for m in _CONNECT.finditer(f.read())}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A started emulator with the bucket `bert-jax-test`, its variables set in this process (restored after
    the module) so that in-process gs:// reads reach it too; subprocesses take `emulator.env()`."""
    emulator = GcsEmulator(str(tmp_path_factory.mktemp("gcs"))).start()
    try:
        emulator.bucket = emulator.create_bucket("bert-jax-test")
        env = emulator.env()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield emulator
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        emulator.stop()
