"""Device choice, mixed precision and seeding."""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from benchmark.errors import UsageError


def pick_device(request: str) -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; otherwise the named device, checked to exist."""
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(request)
    except RuntimeError:
        raise UsageError(f"device must be auto, cpu, cuda, cuda:<i> or mps, got {request!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {request!r} asked for but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {request!r}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' asked for but MPS is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device must be auto, cpu, cuda, cuda:<i> or mps, got {request!r}")
    return device


def amp_dtype(request: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. Mixed precision is used on CUDA only."""
    if request == "off" or device.type != "cuda":
        return None
    if request == "fp16":
        return torch.float16
    if request == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def derive_seed(seed: int, key: str) -> int:
    """A seed for stream ``key`` of a run, independent of the order streams are created in."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def process_threads(threads: int | None) -> Iterator[None]:
    """Within the block, this process computes on ``threads`` threads: PyTorch's intra-op pool and
    the BLAS and OpenMP pools of NumPy, SciPy and scikit-learn (k-means, the probes), which
    otherwise start one thread per core in every process. Sweep workers share the cores between
    them: a second pool per worker only makes the workers wait on each other. ``None`` leaves
    every pool as it is. The previous sizes are given back afterwards."""
    if not threads:
        yield
        return
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def seeded(seed: int, key: str) -> Iterator[None]:
    """Run a block (module construction) under the seed of stream ``key``; the global RNG
    state outside the block is left as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, key))
        yield


def set_determinism(device: torch.device) -> None:
    """CPU runs repeat to the bit (deterministic kernels). On an accelerator the fast kernels are
    kept (cuDNN autotuning, atomics): a seed fixes initialisation and data order there, and
    results agree to within floating-point noise."""
    deterministic = device.type == "cpu"
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
