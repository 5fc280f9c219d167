"""Processes of a multi-machine deployment, on loopback: vLLM's own OpenAI server (the
upstream of remote engines), a Chroma server, a TCP proxy that takes one route to an
upstream down and up again without touching the upstream itself, and a gateway that
lets only requests with a bearer token through to a server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from server.checkpoints import verify
from server.config import load_settings
from server.engine.vllm import api_server_flags, engine_arguments
from server.profiles import find_profile


def _wait_http(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} was not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class VllmServer:
    """vLLM's OpenAI server serving the default profile as the live server's engine does."""

    port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return load_settings().model

    def start(self) -> None:
        settings = load_settings()
        profile = find_profile(settings.profiles_dir, settings.model)
        checkpoint = verify(profile, settings.models_dir)
        args = engine_arguments(profile, checkpoint, {"max_model_len": 2048})
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(self.port), *api_server_flags(args)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **profile.env, "VLLM_CPU_KVCACHE_SPACE": "1"}
        with self.log.open("a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait_http(self.proc, f"http://127.0.0.1:{self.port}/health", self.log, "vLLM's server", 400)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()


def chroma_command() -> list[str] | None:
    found = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
    return [found] if found else None


def start_chroma(path: Path, port: int, log: Path) -> subprocess.Popen:
    command = chroma_command()
    if command is None:
        pytest.skip("the `chroma` command (the chromadb package's server) is not installed")
    with log.open("a") as fh:
        proc = subprocess.Popen(
            [*command, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
    _wait_http(proc, f"http://127.0.0.1:{port}/api/v2/heartbeat", log, "the Chroma server", 60)
    return proc


class TokenGate:
    """An HTTP reverse proxy that answers 401 to any request without `Authorization:
    Bearer <token>`, as the gateway in front of a shared Chroma server does, and counts
    what it let through and what it refused."""

    def __init__(self, target: str, token: str):
        self.target, self.token = target.rstrip("/"), token
        self.passed = self.refused = 0
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Authorization") != f"Bearer {gate.token}":
                    gate.refused += 1
                    self._reply(401, b'{"error": "Unauthorized"}', {"Content-Type": "application/json"})
                    return
                gate.passed += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization", "content-length")}
                r = httpx.request(self.command, gate.target + self.path, headers=headers, content=body, timeout=60)
                self._reply(r.status_code, r.content, {"Content-Type": r.headers.get("content-type", "application/json")})

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:  # quiet: the test reads the counters
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TcpProxy:
    """Forwards a local port to a target; `close()` drops the listener and every open
    connection (the route is down), `open()` listens again on the same port."""

    def __init__(self, target_port: int, port: int):
        self.target_port = target_port
        self.port = port
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone may not.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if listener is not self._listener:  # closed meanwhile: the route is down
                client.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
