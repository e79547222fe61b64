"""Logging, seeding and RNG state, the device and autocast policy, distributed helpers, and the files every job
writes and reads the same way (atomic writes, JSONL lines, safe names, folder locks). (The config lives in
config.py.)"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from config import ConfigError


# ----------------------------------------------------------------------------------------------------------
# logging


def setup_logging(output_dir: str | None = None, rank: int = 0, filename: str = "train.log") -> logging.Logger:
    """Log INFO to stdout (rank 0 only) and, when output_dir is given, to <output_dir>/<filename> (rank 0)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(output_dir) / filename, mode="a", encoding="utf-8")
        file.setFormatter(fmt)
        root.addHandler(file)
    return logging.getLogger("salmonn")


# ----------------------------------------------------------------------------------------------------------
# seeding and RNG state


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors/lists/numbers, so a checkpoint loads with torch.load(weights_only=True)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state()."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


# ----------------------------------------------------------------------------------------------------------
# device and precision


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda when visible), `cpu`, `cuda` or `cuda:N`; asking for a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but no CUDA device is visible (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def autocast_dtype(precision: str, device: torch.device, weights_dtype: torch.dtype = torch.float32
                   ) -> torch.dtype | None:
    """The autocast dtype of `run.precision` (None = fp32), for training and inference alike.

    auto: fp32 on CPU; on a GPU the frozen weights' own half dtype when `model.torch_dtype` is one, else bf16
    where the GPU has it, else fp16. bf16/fp16/fp32 force it (fp16 training adds a GradScaler)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        if weights_dtype in (torch.bfloat16, torch.float16):
            return weights_dtype
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast for `dtype` (a no-op context for None). Autocast is per thread: enter it in the thread that
    runs the model."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, local rank, world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", run: Any = None) -> DistInfo:
    """Join the process group that torchrun describes (env://): nccl on GPUs, gloo on CPU.

    Without torchrun's variables this is a single process on `device` (auto = cuda if available). `run`: the run
    section, whose original launch keys (use_distributed, world_size, dist_url) must agree with torchrun's
    environment (ConfigError naming the key otherwise).
    """
    if run is not None:
        check_launch(run.get("use_distributed"), run.get("world_size"), run.get("dist_url"), os.environ)
    device = resolve_device(device).type
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=timedelta(minutes=30),
            device_id=torch_device if device == "cuda" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def check_launch(use_distributed: bool | None, world_size: int | None, dist_url: str | None,
                 environ: Mapping[str, str]) -> None:
    """The original's launch keys against how this process was started: torchrun sets WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT. What contradicts torchrun's launch (another world size, distribution switched off under several
    processes, another rendezvous) is an error. Started without torchrun, the script is one process whatever the
    keys say, as the original's was (Nota's stage configs say world_size: 2 and are dry-run with `python
    train.py`): a world size above 1 is then only warned about."""
    started = int(environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in environ:
        if world_size is not None and world_size > 1:
            logging.getLogger(__name__).warning(
                "run.world_size is %d, but the script was started without torchrun: one process (start it with "
                "torchrun --nproc_per_node %d for %d)", world_size, world_size, world_size)
        return
    how = f"torchrun started {started} process(es)"
    if use_distributed is False and started > 1:
        raise ConfigError(f"run.use_distributed is false, but {how}: set it to true, or start with python")
    if world_size is not None and world_size != started:
        raise ConfigError(f"run.world_size is {world_size}, but {how}: start with torchrun --nproc_per_node "
                          f"{world_size} (times --nnodes), or set it to {started}")
    rendezvous = f"tcp://{environ.get('MASTER_ADDR')}:{environ.get('MASTER_PORT')}"
    if started > 1 and dist_url not in (None, "env://", rendezvous):
        raise ConfigError(f"run.dist_url is {dist_url!r}, but torchrun's rendezvous is {rendezvous}: use env:// "
                          "(or remove the key)")


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op on one process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list on one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------------------
# one run per folder


LOCK_NAME = ".lock"


# ----------------------------------------------------------------------------------------------------------
# files


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file to write that appears at `path` whole or not at all: written through a temporary file named after
    this process in the same folder, flushed to disk, then renamed. A crash leaves the old file or the new one,
    two writers never share a temporary file, and a failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented UTF-8 JSON, atomically (atomic_file); the folder is made if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


class JsonlError(ValueError):
    """A JSONL line that is not UTF-8 or not JSON; `reason` is its short key (not_utf8, malformed_json)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """("file:line", value) for each non-blank line of a JSONL file. A line that is not UTF-8 or not JSON gives a
    JsonlError naming it in its place, so each caller decides: report every bad line (convert.py, the package
    validator), stop at the first (the judge), or drop a last line cut by a kill (a partial decode)."""
    lines = []
    for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            lines.append((where, json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError as e:
            lines.append((where, JsonlError("not_utf8", f"{where}: not UTF-8 text (byte {e.start + 1} of the line): "
                                                        "save the file as UTF-8")))
        except json.JSONDecodeError as e:
            lines.append((where, JsonlError("malformed_json", f"{where}: malformed JSON: {e.msg} (column {e.colno})")))
    return lines



def jsonl_values(path: str | os.PathLike) -> list[Any]:
    """The values of a JSONL file (read_jsonl), for readers that stop at the first bad line: it is a JsonlError
    naming the file and line."""
    values = []
    for _, value in read_jsonl(path):
        if isinstance(value, JsonlError):
            raise value
        values.append(value)
    return values

def plain_name_problem(value: object) -> str | None:
    """Why a dialogue id, turn id, language or output name cannot name a file inside a folder (None when it can):
    they become parts of output paths, so a path separator, `..` or nothing would write outside the folder."""
    name = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if name is None or name.strip() in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        return (f"{value!r} is not a plain file name (it becomes part of a file name inside the output folder: no "
                "'/', '\\', '..', control characters or empty)")
    return None


class FolderInUse(RuntimeError):
    """An output folder that another running process holds."""


def hold_folder(folder: str | os.PathLike, program: str) -> IO[str]:
    """An exclusive OS lock on <folder>/.lock, held until the returned file is closed (use it as a context
    manager) or the process ends, however it ends: a second run into the folder stops at once, naming the holder.
    A POSIX record lock (lockf), not flock: forked children (data loader workers) do not inherit it, so it dies
    with its process at once and a killed run leaves none behind. The file only names the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            lock.close()
            raise
        holder = lock.read().strip() or "a process that has not written its pid yet"
        lock.close()
        raise FolderInUse(f"{folder} is in use by another run ({holder}): wait for it to end, or choose another "
                          "output folder") from None
    lock.truncate()
    lock.write(f"{program} pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


# ----------------------------------------------------------------------------------------------------------
# messages


def error_message(error: BaseException) -> str:
    """The error's own message, on one line: an error raised in a DataLoader worker comes back with the worker's
    traceback in its message ("Caught AudioError in DataLoader worker process 0. Original Traceback ..."), whose
    last line is the original message."""
    message = str(error)
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


# ----------------------------------------------------------------------------------------------------------
# provenance


def code_version() -> str:
    """The repository's commit (with `+dirty` when the tree has uncommitted changes), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Path, size and sha256 of a checkpoint: what a score records of the checkpoint it came from. A folder (an
    exported adapter) is hashed over its files' names and digests, in name order. A decode asks twice (to resume,
    then to record), so each digest is remembered while its file's size and mtime stay the same."""
    path = Path(path).resolve()
    if not path.is_dir():
        stat = path.stat()
        return {"path": str(path), "bytes": stat.st_size, "sha256": _sha256(str(path), stat.st_size,
                                                                          stat.st_mtime_ns)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{_sha256(str(file), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return {"path": str(path), "bytes": sum(f.stat().st_size for f in files), "sha256": digest.hexdigest()}


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; size and mtime are part of the cache key, so a rewritten file is read again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
