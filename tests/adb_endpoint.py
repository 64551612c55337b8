"""A test double of a phone's adbd: the device end of the adb protocol, for tests against the REAL adb server.

No adbd can be installed here (Debian, PyPI and npm ship only clients; emulation.md §4), so this stands in for
the phone. It speaks the transport protocol the adb server speaks over TCP to `adb connect`ed devices: CNXN
without AUTH, OPEN/OKAY/WRTE/CLSE with flow control, and the services the harness uses: `shell:` (v1: one
merged stream, no exit code), `shell,v2,...:` (stdout, stderr and the exit code as framed packets) and `sync:`
(STAT, LIST, SEND/DATA/DONE, RECV, QUIT).

Every device command and file operation is a shell command run by a *backend*:
  local (default)   `sh -c CMD` on this host;
  --ssh-port ...    `ssh ... CMD` into the arm64 stand-in VM (make pi-vm), so commands and files live there.

  python tests/adb_endpoint.py --port 0               # prints "adb endpoint listening on 127.0.0.1:PORT"
  python tests/adb_endpoint.py --port 0 --no-shell-v2 --getprop ro.product.model=Pixel
  python tests/adb_endpoint.py --port 0 --ssh-port 2226 --ssh-key .pi/key
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE = (
    int.from_bytes(c, "little") for c in (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE")
)
VERSION = 0x01000001  # skips payload checksums
MAX_DATA = 256 * 1024
SYNC_CHUNK = 64 * 1024
SHELL_STDIN, SHELL_STDOUT, SHELL_STDERR, SHELL_EXIT, SHELL_CLOSE_STDIN = 0, 1, 2, 3, 4


class Backend:
    """Runs a shell command on "the device": on this host, or inside the VM over ssh."""

    def __init__(self, ssh: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.ssh, self.env = ssh, env

    def spawn(self, cmd: str, merge_stderr: bool = False) -> subprocess.Popen:
        argv = [*self.ssh, cmd] if self.ssh else ["/bin/sh", "-c", cmd]
        err = subprocess.STDOUT if merge_stderr else subprocess.PIPE
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=self.env, start_new_session=True
        )

    def call(self, cmd: str, data: bytes = b"") -> tuple[int, bytes]:
        proc = self.spawn(cmd, merge_stderr=True)
        out, _ = proc.communicate(data)
        return proc.returncode, out


class Stream:
    """One OPENed service: an inbox of the host's WRTE payloads and flow-controlled writes back."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int) -> None:
        self.conn, self.local_id, self.remote_id = conn, local_id, remote_id
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.buffer = b""
        self.may_write = threading.Semaphore(1)  # one WRTE in flight until the host's OKAY
        self.closed = threading.Event()
        self.proc: subprocess.Popen | None = None

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.max_data):
            while not self.may_write.acquire(timeout=0.5):
                if self.closed.is_set():
                    raise ConnectionError("stream closed by the host")
            self.conn.send(A_WRTE, self.local_id, self.remote_id, data[i : i + self.conn.max_data])

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.inbox.get()
            if chunk is None:
                raise ConnectionError("stream closed by the host")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def host_closed(self) -> None:
        self.closed.set()
        self.inbox.put(None)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the host went away: so does the command, as on adbd

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.conn.send(A_CLSE, self.local_id, self.remote_id)


class Connection:
    """One TCP connection from the adb server: the transport of one device."""

    def __init__(self, sock: socket.socket, endpoint: Endpoint) -> None:
        self.sock, self.endpoint = sock, endpoint
        self.lock = threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_data = 4096

    def send(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        header = struct.pack("<6I", cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF)
        with self.lock:
            self.sock.sendall(header + data)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("adb server closed the connection")
            buf += chunk
        return buf

    def serve(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, length, _, _ = struct.unpack("<6I", self.recv_exact(24))
                data = self.recv_exact(length) if length else b""
                if cmd == A_CNXN:
                    self.max_data = min(arg1, MAX_DATA)
                    self.send(A_CNXN, VERSION, MAX_DATA, self.endpoint.banner())
                elif cmd == A_OPEN:
                    self.open(arg0, data.rstrip(b"\0").decode())
                elif cmd == A_OKAY and arg1 in self.streams:
                    self.streams[arg1].may_write.release()
                elif cmd == A_WRTE and arg1 in self.streams:
                    self.send(A_OKAY, arg1, arg0)
                    self.streams[arg1].inbox.put(data)
                elif cmd == A_CLSE and arg1 in self.streams:
                    self.streams.pop(arg1).host_closed()
        except (ConnectionError, OSError):
            pass
        finally:
            for stream in list(self.streams.values()):
                stream.host_closed()
            self.sock.close()

    def open(self, remote_id: int, service: str) -> None:
        if service.startswith("shell,v2,") or service.startswith("shell:") or service == "sync:":
            local_id, self.next_id = self.next_id, self.next_id + 1
            stream = self.streams[local_id] = Stream(self, local_id, remote_id)
            self.send(A_OKAY, local_id, remote_id)
            threading.Thread(target=self.endpoint.run_service, args=(stream, service), daemon=True).start()
        else:
            self.send(A_CLSE, 0, remote_id)  # unknown service: refused


class Endpoint:
    def __init__(self, backend: Backend, shell_v2: bool = True, model: str = "FakeArm64") -> None:
        self.backend, self.shell_v2, self.model = backend, shell_v2, model

    def banner(self) -> bytes:
        features = "shell_v2,cmd" if self.shell_v2 else "cmd"
        props = f"ro.product.name=edgesr_endpoint;ro.product.model={self.model};ro.product.device=endpoint"
        return f"device::{props};features={features}".encode()

    def run_service(self, stream: Stream, service: str) -> None:
        try:
            if service == "sync:":
                self.sync(stream)
            elif service.startswith("shell,v2,"):
                self.shell_v2_service(stream, service.partition(":")[2])
            else:
                self.shell_v1_service(stream, service.partition(":")[2])
        except (ConnectionError, OSError):
            pass
        finally:
            stream.close()

    def shell_v1_service(self, stream: Stream, cmd: str) -> None:
        stream.proc = proc = self.backend.spawn(cmd, merge_stderr=True)
        proc.stdin.close()
        while chunk := proc.stdout.read1(65536):
            stream.write(chunk)
        proc.wait()

    def shell_v2_service(self, stream: Stream, cmd: str) -> None:
        stream.proc = proc = self.backend.spawn(cmd)

        def pump(pipe, packet_id: int) -> None:
            while chunk := pipe.read1(65536):
                stream.write(struct.pack("<BI", packet_id, len(chunk)) + chunk)

        def feed_stdin() -> None:
            try:
                while True:
                    packet_id, length = struct.unpack("<BI", stream.read(5))
                    payload = stream.read(length)
                    if packet_id == SHELL_STDIN:
                        proc.stdin.write(payload)
                        proc.stdin.flush()
                    elif packet_id == SHELL_CLOSE_STDIN:
                        proc.stdin.close()
            except (ConnectionError, OSError, ValueError):
                pass

        threading.Thread(target=feed_stdin, daemon=True).start()
        pumps = [threading.Thread(target=pump, args=a) for a in ((proc.stdout, 1), (proc.stderr, 2))]
        for t in pumps:
            t.start()
        for t in pumps:
            t.join()
        code = proc.wait()
        stream.write(struct.pack("<BIB", SHELL_EXIT, 1, code & 0xFF if code >= 0 else 128 - code))

    def sync(self, stream: Stream) -> None:
        while True:
            request, length = struct.unpack("<4sI", stream.read(8))
            if request == b"QUIT":
                return
            arg = stream.read(length)
            if request == b"STAT":
                stream.write(b"STAT" + struct.pack("<3I", *self.stat(arg)))
            elif request == b"LIST":
                for mode, size, mtime, name in self.listdir(arg):
                    stream.write(b"DENT" + struct.pack("<4I", mode, size, mtime, len(name)) + name)
                stream.write(b"DONE" + bytes(16))
            elif request == b"SEND":
                path, _, mode = arg.rpartition(b",")
                self.receive_file(stream, path, int(mode or b"420") & 0o7777)
            elif request == b"RECV":
                code, data = self.backend.call("cat -- " + quote(arg))
                if code:
                    fail(stream, f"remote object '{arg.decode(errors='replace')}' does not exist")
                    continue
                for i in range(0, len(data), SYNC_CHUNK):
                    stream.write(b"DATA" + struct.pack("<I", len(data[i : i + SYNC_CHUNK])) + data[i : i + SYNC_CHUNK])
                stream.write(b"DONE" + bytes(4))
            else:
                fail(stream, f"unknown sync request {request!r}")
                return

    def stat(self, path: bytes) -> tuple[int, int, int]:
        code, out = self.backend.call("stat -L -c '%f %s %Y' -- " + quote(path))
        if code:
            return 0, 0, 0  # mode 0: no such file
        mode, size, mtime = out.split()
        return int(mode, 16), int(size) & 0xFFFFFFFF, int(mtime)

    def listdir(self, path: bytes) -> list[tuple[int, int, int, bytes]]:
        fmt = r"%y %m %s %T@ %f\0"
        code, out = self.backend.call(f"find {quote(path)} -mindepth 1 -maxdepth 1 -printf '{fmt}'")
        kinds = {b"d": stat.S_IFDIR, b"f": stat.S_IFREG, b"l": stat.S_IFLNK}
        entries = []
        for item in out.split(b"\0")[:-1] if code == 0 else []:
            kind, perm, size, mtime, name = item.split(b" ", 4)
            entries.append((kinds.get(kind, 0) | int(perm, 8), int(size) & 0xFFFFFFFF, int(float(mtime)), name))
        return entries

    def receive_file(self, stream: Stream, path: bytes, mode: int) -> None:
        chunks = []
        while True:
            kind, length = struct.unpack("<4sI", stream.read(8))
            if kind == b"DONE":
                break
            chunks.append(stream.read(length))
        p = quote(path)
        code, out = self.backend.call(
            f'mkdir -p -- "$(dirname -- {p})" && cat > {p} && chmod {mode:o} -- {p}', b"".join(chunks)
        )
        if code:
            fail(stream, f"couldn't create file: {out.decode(errors='replace').strip()}")
        else:
            stream.write(b"OKAY" + bytes(4))


def quote(path: bytes) -> str:
    return shlex.quote(path.decode("utf-8", "surrogateescape"))


def fail(stream: Stream, message: str) -> None:
    stream.write(b"FAIL" + struct.pack("<I", len(message.encode())) + message.encode())


def getprop_env(props: dict[str, str]) -> dict[str, str]:
    """An environment whose PATH starts with a `getprop` script answering `props` (Android's property tool)."""
    folder = Path(tempfile.mkdtemp(prefix="edgesr-getprop-"))
    cases = "".join(f"  {shlex.quote(k)}) echo {shlex.quote(v)} ;;\n" for k, v in props.items())
    (folder / "getprop").write_text(f'#!/bin/sh\ncase "$1" in\n{cases}  *) echo ;;\nesac\n')
    (folder / "getprop").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--no-shell-v2", action="store_true", help="advertise no shell_v2: adb falls back to v1")
    parser.add_argument("--model", default="FakeArm64", help="ro.product.model in the connection banner")
    parser.add_argument("--getprop", action="append", default=[], metavar="KEY=VALUE", help="answer getprop KEY")
    parser.add_argument("--ssh-port", type=int, help="run everything in the VM over ssh on 127.0.0.1:PORT")
    parser.add_argument("--ssh-key", help="identity file for --ssh-port")
    parser.add_argument("--ssh-known-hosts", help="known_hosts pinning the VM's host key (default: no check)")
    args = parser.parse_args(argv)
    ssh = None
    if args.ssh_port:
        known = ["-o", f"UserKnownHostsFile={args.ssh_known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        if not args.ssh_known_hosts:
            known = ["-o", "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no"]
        control = Path(tempfile.mkdtemp(prefix="edgesr-adb-ssh-")) / "c"
        ssh = ["ssh", "-p", str(args.ssh_port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", *known]
        ssh += ["-o", "LogLevel=ERROR"]
        ssh += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control}", "-o", "ControlPersist=120"]
        ssh += ["-i", args.ssh_key] if args.ssh_key else []
        ssh += ["root@127.0.0.1"]
    props = dict(item.split("=", 1) for item in args.getprop)
    endpoint = Endpoint(Backend(ssh, getprop_env(props) if props else None), not args.no_shell_v2, args.model)
    server = socket.create_server(("127.0.0.1", args.port))
    print(f"adb endpoint listening on 127.0.0.1:{server.getsockname()[1]}", flush=True)
    while True:
        sock, _ = server.accept()
        threading.Thread(target=Connection(sock, endpoint).serve, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
