"""Real distributed NoNN inference: one process per student ("device") and an aggregator.

Each device process loads *only its own student* from a ``nonn`` model file, listens on a TCP
port (127.0.0.1 by default) and answers every inference request with the student's pooled feature
vectors. The aggregator sends the input to every device, gathers the vectors until a deadline,
treats a device that is down (connection refused or reset) or late (no answer by the deadline) as
failed, fills its vector (zeros, or the mean of its neighbours' vectors) and applies the head. The
answer always comes, at the latest at the deadline.

Wire protocol (version 1), the same in both directions; every message is one frame::

    magic  b"NoNN"   4 bytes
    version          1 byte (1)
    header length    4 bytes, unsigned big-endian
    payload length   4 bytes, unsigned big-endian
    header           UTF-8 JSON object: {"op": ..., "id": ..., "dtype": ..., "shape": [...], ...}
    payload          the tensor's raw bytes, C order, little-endian (empty when there is none)

Operations: ``infer`` (aggregator -> device, payload: the batch of inputs, float32 already
normalised or uint8 pixels that the device normalises with the dataset statistics stored in the
model file) answered by ``features`` (payload: float32 B x D, same ``id``); ``ping`` answered by
``pong`` (device index, feature size); ``classify`` (client -> aggregator server, payload: inputs)
answered by ``logits`` (header lists the failed devices); ``error`` carries a message.

Run a device by hand with ``python -m kdforge.nonn.serve device --model M --index I``; the
``kdforge serve-nonn`` command starts all of them and the aggregator (see docs/nonn.md).

Limits (a peer is not trusted): a header over ``MAX_HEADER`` bytes or a payload over
``MAX_PAYLOAD`` bytes is refused as soon as its prefix arrives (nothing is buffered); at most
``MAX_CONNECTIONS`` connections are served at once (more are closed at once); a malformed frame
gets an ``error`` answer and the connection is closed, and every such error is counted
(``Device.errors``), never printed as a thread traceback. ``shutdown`` needs the serving run's
secret token (``DeviceCluster`` draws one per run and hands it to its devices through the
environment, ``KDFORGE_NONN_TOKEN``); a device without a token refuses every ``shutdown``.
Devices started by ``DeviceCluster`` die with the process that started them, even by ``kill -9``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.core.errors import CheckpointError, KDForgeError
from kdforge.core.signals import PARENT_ENV, die_with_parent

MAGIC = b"NoNN"
VERSION = 1
_PREFIX = struct.Struct("!4sBII")
PREFIX_BYTES = _PREFIX.size  # 13
#: the largest payload accepted (a batch of 1,000 CIFAR images in float32 is 12 MiB)
MAX_PAYLOAD = 64 << 20
#: the largest JSON header accepted
MAX_HEADER = 64 << 10
#: connections a device or aggregator server serves at once
MAX_CONNECTIONS = 32
#: the environment variable that carries a serving run's shutdown token to its devices
TOKEN_ENV = "KDFORGE_NONN_TOKEN"

_DTYPES = {"float32": (torch.float32, np.float32), "uint8": (torch.uint8, np.uint8)}


class ProtocolError(KDForgeError):
    """A peer sent something that is not a NoNN frame."""


# --------------------------------------------------------------------------- frames
def encode(header: dict[str, Any], tensor: Tensor | None = None) -> bytes:
    """One frame: prefix, JSON header (with dtype and shape of ``tensor``), raw payload."""
    header = dict(header)
    payload = b""
    if tensor is not None:
        name = str(tensor.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            tensor, name = tensor.float(), "float32"
        array = tensor.detach().cpu().contiguous().numpy()
        payload = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header.update(dtype=name, shape=list(tensor.shape))
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(head), len(payload)) + head + payload


def decode_payload(header: dict[str, Any], payload: bytes) -> Tensor | None:
    if not payload and "shape" not in header:
        return None
    dtype = header.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ProtocolError(f"unknown dtype {dtype!r}")
    np_dtype = np.dtype(_DTYPES[dtype][1]).newbyteorder("<")
    shape = header.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    if int(np.prod(shape)) * np_dtype.itemsize != len(payload):
        raise ProtocolError(f"a {dtype} tensor of shape {shape} does not fit a payload of {len(payload)} bytes")
    array = np.frombuffer(payload, dtype=np_dtype).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def frame_bytes(header: dict[str, Any], shape: tuple[int, ...] | None = None, dtype: str = "float32") -> int:
    """Size of the frame ``encode`` would make for a tensor of ``shape`` (without building it)."""
    header = dict(header)
    payload = 0
    if shape is not None:
        header.update(dtype=dtype, shape=list(shape))
        payload = int(np.prod(shape)) * np.dtype(_DTYPES[dtype][1]).itemsize
    return PREFIX_BYTES + len(json.dumps(header, separators=(",", ":")).encode()) + payload


class FrameReader:
    """Incremental parser: ``feed(bytes)`` returns the complete frames received so far."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pending: list[tuple[dict[str, Any], Tensor | None, int]] = []  # for read_frame

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], Tensor | None, int]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= PREFIX_BYTES:
            magic, version, head_len, payload_len = _PREFIX.unpack_from(self.buffer)
            if magic != MAGIC or version != VERSION:
                raise ProtocolError(f"not a NoNN v{VERSION} frame (magic {bytes(magic)!r}, version {version})")
            if payload_len > MAX_PAYLOAD:
                raise ProtocolError(f"payload of {payload_len} bytes is over the limit of {MAX_PAYLOAD}")
            if head_len > MAX_HEADER:
                raise ProtocolError(f"header of {head_len} bytes is over the limit of {MAX_HEADER}")
            total = PREFIX_BYTES + head_len + payload_len
            if len(self.buffer) < total:
                break
            try:
                header = json.loads(bytes(self.buffer[PREFIX_BYTES : PREFIX_BYTES + head_len]))
            except (ValueError, UnicodeDecodeError):
                raise ProtocolError("the frame's header is not JSON") from None
            if not isinstance(header, dict):
                raise ProtocolError("the frame's header is not a JSON object")
            payload = bytes(self.buffer[PREFIX_BYTES + head_len : total])
            del self.buffer[:total]
            frames.append((header, decode_payload(header, payload), total))
        return frames


def read_frame(sock: socket.socket, reader: FrameReader | None = None) -> tuple[dict[str, Any], Tensor | None, int]:
    """Block until one whole frame has arrived on ``sock`` (honours the socket's timeout)."""
    reader = reader or FrameReader()
    while not reader.pending:
        data = sock.recv(1 << 16)
        if not data:
            raise ConnectionError("peer closed the connection")
        reader.pending.extend(reader.feed(data))
    return reader.pending.pop(0)


# --------------------------------------------------------------------------- model files
def load_system_record(path: str | Path) -> dict[str, Any]:
    """The model file of a ``nonn`` system (checked)."""
    from kdforge.core.checkpoint import read_model_file

    record = read_model_file(path)
    if (record.get("model") or {}).get("name") != "nonn":
        raise CheckpointError(f"'{path}' is not a NoNN system (model 'nonn'); train one with method 'nonn'")
    return record


def _spec(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = record["model"]
    return spec, dict(spec.get("kwargs") or {})


def num_devices(record: dict[str, Any]) -> int:
    _, kwargs = _spec(record)
    return len(kwargs["groups"]) if kwargs.get("groups") else int(kwargs["num_students"])


def load_student(record: dict[str, Any], index: int) -> nn.Module:
    """Student ``index`` alone (a pooled-feature extractor), weights from the system's file."""
    from kdforge.core.checkpoint import load_weights
    from kdforge.models.nonn import make_student

    spec, kwargs = _spec(record)
    count = num_devices(record)
    if not 0 <= index < count:
        raise KDForgeError(f"device index {index} is outside 0..{count - 1}")
    size = tuple(spec["input_size"]) if spec.get("input_size") else None
    student, _ = make_student(
        kwargs.get("student", "resnet8"),
        spec["num_classes"],
        spec["in_channels"],
        size,
        **(kwargs.get("student_kwargs") or {}),
    )
    prefix = f"students.{index}."
    state = {k[len(prefix) :]: v for k, v in record["state_dict"].items() if k.startswith(prefix)}
    load_weights(student, state, f"{record.get('path', 'model file')} (student {index})")
    return student.eval()


def load_head(record: dict[str, Any]) -> nn.Linear:
    weight, bias = record["state_dict"]["head.weight"], record["state_dict"]["head.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval()


def load_system(path: str | Path):
    """The whole ``NoNNSystem`` (for in-process inference and the failure study)."""
    from kdforge.core.checkpoint import load_weights
    from kdforge.models import create

    record = load_system_record(path)
    spec, kwargs = _spec(record)
    model = create(
        "nonn",
        num_classes=spec["num_classes"],
        in_channels=spec["in_channels"],
        input_size=tuple(spec["input_size"]) if spec.get("input_size") else None,
        **kwargs,
    )
    load_weights(model, record["state_dict"], str(path))
    return model.eval()


def _normalizer(record: dict[str, Any]):
    dataset = record.get("dataset") or {}
    mean, std = dataset.get("mean"), dataset.get("std")
    if mean is None or std is None:
        return lambda x: x.float() / 255.0
    from kdforge.data import Augmentation

    return Augmentation(mean=tuple(mean), std=tuple(std)).normalize


# --------------------------------------------------------------------------- device
class Device:
    """One student behind a TCP port; each connection is served by its own thread."""

    def __init__(
        self, model_path: str | Path, index: int, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0
    ) -> None:
        record = load_system_record(model_path)
        record["path"] = str(model_path)
        self.index = index
        self.student = load_student(record, index)
        self.normalize = _normalizer(record)
        self.delay = delay
        self.server = socket.create_server((host, port))
        self.address = self.server.getsockname()[:2]
        self.lock = threading.Lock()  # one forward at a time (one "device")
        self.stopping = threading.Event()
        self.token = os.environ.get(TOKEN_ENV) or None  # None: remote shutdown refused
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.errors = 0  # malformed frames and handler failures, counted (never a traceback)
        self.refused = 0  # connections over MAX_CONNECTIONS and shutdowns without the token
        self._count_lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._count_lock:
            setattr(self, what, getattr(self, what) + 1)

    def features(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        with self.lock, torch.inference_mode():
            out = self.student(x.float())
        return out.float()

    def handle(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        except Exception:  # noqa: BLE001 - a peer's mistake must never kill the device or print a traceback
            self._count("errors")
        finally:
            self.slots.release()
            try:
                conn.close()
            except OSError:
                pass

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = FrameReader()
        with conn:
            while not self.stopping.is_set():
                try:
                    header, tensor, _ = read_frame(conn, reader)
                except (ConnectionError, OSError):
                    return
                except ProtocolError as exc:  # the stream cannot be resynchronised: answer, then close
                    self._count("errors")
                    try:
                        conn.sendall(encode({"op": "error", "device": self.index, "message": str(exc)}))
                    except OSError:
                        pass
                    return
                op = header.get("op")
                try:
                    if op == "infer":
                        if tensor is None:
                            raise ProtocolError("infer without an input tensor")
                        out = self.features(tensor)
                        if self.delay:
                            time.sleep(self.delay)
                        reply = encode({"op": "features", "id": header.get("id"), "device": self.index}, out)
                    elif op == "ping":
                        reply = encode({"op": "pong", "id": header.get("id"), "device": self.index, "pid": os.getpid()})
                    elif op == "shutdown":
                        given = header.get("token")
                        if (
                            self.token is None
                            or not isinstance(given, str)
                            or not hmac.compare_digest(given, self.token)
                        ):
                            self._count("refused")
                            raise ProtocolError("shutdown refused: it needs this serving run's token")
                        self.stopping.set()
                        self.server.close()
                        return
                    else:
                        raise ProtocolError(f"unknown op {op!r}")
                except Exception as exc:  # noqa: BLE001 - report to the peer, keep serving
                    self._count("errors")
                    message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
                    reply = encode({"op": "error", "id": header.get("id"), "device": self.index, "message": message})
                try:
                    conn.sendall(reply)
                except OSError:
                    return

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):  # over MAX_CONNECTIONS: refuse at once
                self._count("refused")
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()


def run_device(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdforge.nonn.serve device")
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer (tests)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    die_with_parent()  # started by DeviceCluster: stop when serve-nonn dies, even by kill -9
    torch.set_num_threads(args.threads)
    device = Device(args.model, args.index, args.host, args.port, args.delay)
    print(f"READY {device.address[0]} {device.address[1]}", flush=True)
    try:
        device.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- cluster
class DeviceCluster:
    """Start every student of a model file as its own process on ``host``; ports are chosen by the
    system (each process prints ``READY host port``). Use as a context manager."""

    def __init__(
        self,
        model_path: str | Path,
        host: str = "127.0.0.1",
        *,
        delays: dict[int, float] | None = None,
        threads: int = 1,
        startup_timeout: float = 180.0,
    ) -> None:
        self.model_path = str(model_path)
        self.count = num_devices(load_system_record(model_path))
        self.host = host
        self.delays = delays or {}
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[tuple[str, int]] = []
        self.token = secrets.token_hex(16)  # this serving run's shutdown token

    def start(self) -> DeviceCluster:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(self.threads),
            "PYTHONUNBUFFERED": "1",
            TOKEN_ENV: self.token,  # the environment, not argv: other users cannot read it from ps
            PARENT_ENV: str(os.getpid()),
        }
        for index in range(self.count):
            command = [
                sys.executable,
                "-m",
                "kdforge.nonn.serve",
                "device",
                "--model",
                self.model_path,
                "--index",
                str(index),
                "--host",
                self.host,
                "--port",
                "0",
                "--threads",
                str(self.threads),
                "--delay",
                str(self.delays.get(index, 0.0)),
            ]
            self.processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
        deadline = time.monotonic() + self.startup_timeout
        for index, process in enumerate(self.processes):
            line = self._read_line(process, deadline)
            if not line.startswith("READY"):
                error = process.stderr.read().decode(errors="replace")[-2000:] if process.poll() is not None else ""
                self.stop()
                raise KDForgeError(f"device {index} did not start: {line or 'no output'} {error}".strip())
            _, host, port = line.split()
            self.addresses.append((host, int(port)))
        return self

    @staticmethod
    def _read_line(process: subprocess.Popen, deadline: float) -> str:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return ""
                if selector.select(timeout=remaining):
                    return process.stdout.readline().decode().strip()
                if process.poll() is not None:
                    return ""
        finally:
            selector.close()

    def kill(self, index: int) -> None:
        """Kill device ``index`` outright (SIGKILL): a device failure."""
        process = self.processes[index]
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)

    def alive(self) -> list[bool]:
        return [p.poll() is None for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> DeviceCluster:
        return self.start() if not self.processes else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- aggregator
@dataclass
class Answer:
    """What one aggregated inference returned and cost."""

    logits: Tensor
    failed: list[int]
    down: list[int] = field(default_factory=list)
    late: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    devices: int = 0

    @property
    def answered(self) -> list[int]:
        return [i for i in range(self.devices) if i not in self.failed]


class Aggregator:
    """Sends inputs to the devices, waits at most ``deadline`` seconds, combines what came back.

    Connections are kept open between requests; a device that failed is retried (a fresh
    connection) at the next request, so a restarted device rejoins.
    """

    def __init__(
        self, addresses: list[tuple[str, int]], head: nn.Linear, *, fill: str = "zeros", deadline: float = 1.0
    ) -> None:
        from kdforge.models.nonn import FILL_MODES

        if fill not in FILL_MODES:
            raise KDForgeError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
        if head.in_features % len(addresses):
            raise KDForgeError(f"a head of {head.in_features} inputs does not fit {len(addresses)} devices")
        self.addresses = list(addresses)
        self.head = head.eval()
        self.fill = fill
        self.deadline = deadline
        self.feature_dim = head.in_features // len(addresses)
        self.connections: list[socket.socket | None] = [None] * len(addresses)
        self.readers = [FrameReader() for _ in addresses]
        self.request_id = 0

    @classmethod
    def from_model_file(
        cls, path: str | Path, addresses: list[tuple[str, int]], *, fill: str | None = None, deadline: float = 1.0
    ) -> Aggregator:
        record = load_system_record(path)
        _, kwargs = _spec(record)
        return cls(addresses, load_head(record), fill=fill or kwargs.get("fill", "zeros"), deadline=deadline)

    def _drop(self, index: int) -> None:
        conn = self.connections[index]
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        self.connections[index] = None
        self.readers[index] = FrameReader()

    def _connect(self, index: int, timeout: float) -> socket.socket | None:
        if self.connections[index] is None:
            try:
                conn = socket.create_connection(self.addresses[index], timeout=max(timeout, 1e-3))
            except OSError:
                return None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections[index] = conn
        return self.connections[index]

    def classify(self, x: Tensor) -> Answer:
        """Logits for the batch ``x`` (float32 normalised, or uint8 pixels), within the deadline."""
        from kdforge.models.nonn import fill_missing

        started = time.monotonic()
        end = started + self.deadline
        self.request_id += 1
        rid = self.request_id
        request = encode({"op": "infer", "id": rid}, x)
        count = len(self.addresses)
        features: list[Tensor | None] = [None] * count
        down: set[int] = set()
        sent = received = 0
        waiting: dict[socket.socket, int] = {}
        for i in range(count):
            conn = self._connect(i, end - time.monotonic())
            if conn is None:
                down.add(i)
                continue
            try:
                conn.settimeout(max(end - time.monotonic(), 1e-3))
                conn.sendall(request)
                sent += len(request)
                waiting[conn] = i
            except OSError:
                self._drop(i)
                down.add(i)
        selector = selectors.DefaultSelector()
        for conn, i in waiting.items():
            selector.register(conn, selectors.EVENT_READ, i)
        try:
            while waiting:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(timeout=remaining):
                    i, conn = key.data, key.fileobj
                    try:
                        data = conn.recv(1 << 16)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:  # reset or closed: the device is down
                        selector.unregister(conn)
                        waiting.pop(conn, None)  # type: ignore[arg-type]
                        self._drop(i)
                        down.add(i)
                        continue
                    try:
                        frames = self.readers[i].feed(data)
                    except ProtocolError:
                        frames = []
                        selector.unregister(conn)
                        waiting.pop(conn, None)  # type: ignore[arg-type]
                        self._drop(i)
                        down.add(i)
                    for header, tensor, size in frames:
                        if header.get("id") != rid:
                            continue  # a stale answer to an earlier request
                        received += size
                        if header.get("op") == "features" and tensor is not None:
                            features[i] = tensor
                        else:
                            down.add(i)
                        selector.unregister(conn)
                        waiting.pop(conn, None)  # type: ignore[arg-type]
                        break
        finally:
            selector.close()
        late = sorted(waiting.values())
        for i in late:  # a late answer would arrive on this connection later: start afresh
            self._drop(i)
        with torch.inference_mode():
            if all(f is None for f in features):
                logits = self.head(torch.zeros(len(x), self.head.in_features))
            else:
                logits = self.head(torch.cat(fill_missing(features, self.fill), dim=1))
        failed = sorted(down | set(late))
        return Answer(logits, failed, sorted(down), late, time.monotonic() - started, sent, received, devices=count)

    def close(self) -> None:
        for i in range(len(self.connections)):
            self._drop(i)

    def __enter__(self) -> Aggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- aggregator server
class AggregatorServer:
    """Serves ``classify`` requests (inputs in, logits out) on a TCP port with an Aggregator."""

    def __init__(self, aggregator: Aggregator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.aggregator = aggregator
        self.server = socket.create_server((host, port))
        self.address = self.server.getsockname()[:2]
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.errors = 0
        self.refused = 0

    def handle(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        except Exception:  # noqa: BLE001 - a client's mistake must never print a thread traceback
            self.errors += 1
        finally:
            self.slots.release()
            try:
                conn.close()
            except OSError:
                pass

    def _serve_connection(self, conn: socket.socket) -> None:
        reader = FrameReader()
        with conn:
            while not self.stopping.is_set():
                try:
                    header, tensor, _ = read_frame(conn, reader)
                except (ConnectionError, OSError):
                    return
                except ProtocolError as exc:
                    self.errors += 1
                    try:
                        conn.sendall(encode({"op": "error", "message": str(exc)}))
                    except OSError:
                        pass
                    return
                if header.get("op") == "classify" and tensor is not None:
                    try:
                        with self.lock:
                            answer = self.aggregator.classify(tensor)
                        reply = encode(
                            {
                                "op": "logits",
                                "id": header.get("id"),
                                "failed": answer.failed,
                                "seconds": answer.seconds,
                            },
                            answer.logits,
                        )
                    except Exception as exc:  # noqa: BLE001 - e.g. inputs of the wrong shape: answer, keep serving
                        self.errors += 1
                        message = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
                        reply = encode({"op": "error", "id": header.get("id"), "message": message})
                else:
                    self.errors += 1
                    reply = encode({"op": "error", "id": header.get("id"), "message": "expected classify + inputs"})
                try:
                    conn.sendall(reply)
                except OSError:
                    return

    def serve_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):
                self.refused += 1
                conn.close()
                continue
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.server.close()


def classify_remote(address: tuple[str, int], x: Tensor, timeout: float = 30.0) -> tuple[Tensor, dict[str, Any]]:
    """Client of an AggregatorServer: (logits, reply header)."""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(encode({"op": "classify", "id": 1}, x))
        header, tensor, _ = read_frame(conn)
    if header.get("op") != "logits" or tensor is None:
        raise KDForgeError(f"aggregator answered {header}")
    return tensor, header


# --------------------------------------------------------------------------- accounting
def bytes_per_inference(feature_dim: int, devices: int, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, int]:
    """Frame sizes of one request under this protocol (headers included): every device's answer,
    the input broadcast to every device (float32 and uint8), and the single-model baseline of
    sending the input to one large model (float32 frame, uint8 frame, raw uint8 pixels)."""
    answer = frame_bytes({"op": "features", "id": 1, "device": devices - 1}, (batch, feature_dim))
    request_f32 = frame_bytes({"op": "infer", "id": 1}, (batch, *input_shape), "float32")
    request_u8 = frame_bytes({"op": "infer", "id": 1}, (batch, *input_shape), "uint8")
    return {
        "features_per_device": answer,
        "features_total": answer * devices,
        "features_payload_total": devices * batch * feature_dim * 4,
        "broadcast_float32_total": request_f32 * devices,
        "broadcast_uint8_total": request_u8 * devices,
        "single_model_float32": request_f32,
        "single_model_uint8": request_u8,
        "raw_uint8_pixels": batch * int(np.prod(input_shape)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "device":
        print("usage: python -m kdforge.nonn.serve device --model M --index I [--port P]", file=sys.stderr)
        return 2
    return run_device(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
