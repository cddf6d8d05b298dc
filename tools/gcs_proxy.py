"""A TLS-terminating HTTPS proxy that hands Google Cloud Storage requests to a local fake-gcs-server.

    python tools/gcs_proxy.py --emulator 127.0.0.1:PORT --dir DIR

Why it exists: TensorFlow's GCS filesystem (tf.io.gfile, tf.data, tensorboard's writer through them) has
https://www.googleapis.com compiled in and ignores every emulator variable; it only honours HTTPS_PROXY and
CURL_CA_BUNDLE. So this proxy answers each CONNECT with 200 WITHOUT dialling anything, serves TLS for the
Google API hosts with a throw-away CA (written to DIR/ca.pem), de-chunks request bodies (the emulator wants
a Content-Length) and forwards each request to the emulator on 127.0.0.1 with `Host` rewritten. It runs in
its own process: inside the test process TFRecordWriter holds the GIL while it uploads and the two deadlock.

It also serves plain HTTP to clients given it as their emulator URL (STORAGE_EMULATOR_HOST,
TENSORSTORE_GCS_HTTP_URL), so that every client's requests can pass through it, and it injects faults: while
the file DIR/fault holds "STATUS TEXT" (e.g. "403 checkpoints/6/"), each request whose decoded path contains
TEXT is answered with STATUS and a JSON error instead of being forwarded.

It never opens a connection to anything but the emulator. Every CONNECT target and every request goes to
DIR/proxy.log ("CONNECT host:port", "FORWARD METHOD path", "FAULT STATUS METHOD path", "REFUSED ..."), which
the tests read to assert that only the hosts it terminates itself were asked for. Once listening it writes
its port to DIR/port.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import ssl
import threading
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
_HOP_HEADERS = {"transfer-encoding", "connection", "content-length", "keep-alive", "proxy-connection", "expect"}


def _certificates(directory: str) -> tuple[str, str]:
    """A throw-away CA (DIR/ca.pem, for CURL_CA_BUNDLE) and a leaf for HOSTS signed by it; -> (cert, key) files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=2))

    def cert(subject, issuer, public_key, signing_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(valid[0])
                   .not_valid_after(valid[1]))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bert_jax test CA")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key,
              [(x509.BasicConstraints(ca=True, path_length=None), True)])
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTS[0])]), ca_name, leaf_key.public_key(),
                ca_key, [(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), False),
                         (x509.BasicConstraints(ca=False, path_length=None), True)])
    pem = serialization.Encoding.PEM
    with open(os.path.join(directory, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(pem))
    cert_file, key_file = os.path.join(directory, "leaf.pem"), os.path.join(directory, "leaf.key")
    with open(cert_file, "wb") as f:
        f.write(leaf.public_bytes(pem))
    with open(key_file, "wb") as f:
        f.write(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_file, key_file


class Proxy:
    def __init__(self, emulator: str, directory: str):
        self.emulator = emulator
        self.log_file = open(os.path.join(directory, "proxy.log"), "a", encoding="utf-8", buffering=1)
        self.fault_file = os.path.join(directory, "fault")
        self.lock = threading.Lock()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(*_certificates(directory))

    def log(self, line: str) -> None:
        with self.lock:
            self.log_file.write(line + "\n")

    def serve(self, sock: socket.socket) -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            rfile = conn.makefile("rb")
            line = rfile.readline().decode("latin-1").strip()
            method, target = (line.split() + ["", ""])[:2]
            if target.startswith("/"):  # a client given this proxy as its emulator URL: plain HTTP, no CONNECT
                self._requests(conn, rfile, line)
                return
            _read_headers(rfile)
            host = target.rsplit(":", 1)[0]
            if method != "CONNECT" or host not in HOSTS:
                self.log(f"REFUSED {line}")
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            self.log(f"CONNECT {target}")
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with self.tls.wrap_socket(conn, server_side=True) as tls:
                tls_rfile = tls.makefile("rb")
                self._requests(tls, tls_rfile, tls_rfile.readline().decode("latin-1").strip())
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def _fault(self, path: str) -> int | None:
        """The status to answer instead of forwarding, when DIR/fault ("STATUS TEXT") names a text in `path`."""
        try:
            with open(self.fault_file, encoding="utf-8") as f:
                status, text = f.read().split(maxsplit=1)
        except (OSError, ValueError):
            return None
        return int(status) if text.strip() in urllib.parse.unquote(path) else None

    def _requests(self, sock, rfile, line: str) -> None:
        """Forwards the requests of one connection (keep-alive) to the emulator, one by one, `line` the first
        request line; a request that DIR/fault names is answered with its status and not forwarded."""
        upstream = http.client.HTTPConnection(self.emulator, timeout=120)
        while line:
            method, path = line.split()[:2]
            headers = _read_headers(rfile)
            lower = {k.lower(): v for k, v in headers}
            if lower.get("expect", "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if lower.get("transfer-encoding", "").lower() == "chunked":
                body = _dechunk(rfile)
            else:
                body = rfile.read(int(lower.get("content-length", 0) or 0))
            fault, logged = self._fault(path), _logged(path)
            if fault is not None:
                self.log(f"FAULT {fault} {method} {logged}")
                data = json.dumps({"error": {"code": fault, "message": "injected by tools/gcs_proxy.py"}}).encode()
                status, headers = f"{fault} Injected", [("Content-Type", "application/json")]
            else:
                self.log(f"FORWARD {method} {logged}")
                sent = {k: v for k, v in headers if k.lower() not in _HOP_HEADERS | {"host"}}
                sent["Host"] = self.emulator
                sent["Content-Length"] = str(len(body))
                upstream.request(method, path, body=body, headers=sent)
                resp = upstream.getresponse()
                data = resp.read()
                status = f"{resp.status} {resp.reason}"
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_HEADERS]
            out = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
            out += [f"Content-Length: {len(data)}", "Connection: keep-alive", "", ""]
            sock.sendall("\r\n".join(out).encode("latin-1") + (b"" if method == "HEAD" else data))
            line = rfile.readline().decode("latin-1").strip()


def _logged(path: str) -> str:
    """The request's path without its query, plus the object's name when the query gives it (uploads)."""
    base, _, query = path.partition("?")
    name = urllib.parse.parse_qs(query).get("name")
    return f"{base} name={name[0]}" if name else base


def _read_headers(rfile) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = rfile.readline().decode("latin-1")
        if line in ("\r\n", "\n", ""):
            return headers
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))


def _dechunk(rfile) -> bytes:
    parts = []
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            _read_headers(rfile)  # trailers, then the blank line
            return b"".join(parts)
        parts.append(rfile.read(size))
        rfile.readline()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulator", required=True, help="host:port of fake-gcs-server on 127.0.0.1")
    parser.add_argument("--dir", required=True, help="folder for ca.pem, proxy.log and port")
    args = parser.parse_args()
    if not args.emulator.startswith("127.0.0.1:"):
        raise SystemExit("error: --emulator must be on 127.0.0.1")
    proxy = Proxy(args.emulator, args.dir)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    with open(os.path.join(args.dir, "port.tmp"), "w", encoding="utf-8") as f:
        f.write(str(sock.getsockname()[1]))
    os.replace(os.path.join(args.dir, "port.tmp"), os.path.join(args.dir, "port"))
    proxy.serve(sock)


if __name__ == "__main__":
    main()
