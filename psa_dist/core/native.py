"""Small C kernels (``csrc/pair_l1.c``) for the hot loops of the method, built with the system C
compiler on first use and called through ctypes: the pair L1 distances (the random walk's
transition weights, AffinityNet's loss) and their gradient, and the truncated Chebyshev walk.
Callers use torch ops for the same work where the kernels cannot be had (:func:`available`).

Why not a torch C++ extension: these need no torch headers, so they build in about a second
with plain ``cc`` (no ninja, no 40 s compile of ATen headers), and ctypes releases the GIL so the
threads of :func:`_parallel` run at once. Why not ``torch.compile``: its CPU kernels are fast
for one fixed shape but recompile for every feature-map size (VOC images all differ), and its
dynamic-shape code was 10x slower than eager here.

The library is built with ``-march=native`` into ``$PSA_DIST_CACHE`` (default ``~/.cache/psa_dist``)
under a name that hashes the source, the flags and this CPU's model and flags, so a home directory
shared by different nodes keeps one build per kind of CPU. ``PSA_DIST_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "pair_l1.c"
# -ffp-contract=off: no fused multiply-adds with any compiler, so every build of this source rounds
# alike, and a pixel's result never depends on whether a vector or a scalar loop computed it.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=c99"]
BLOCK = 128                 # the kernel's pixel block; thread chunks are multiples of it

_lock = threading.Lock()
_lib = None                 # the loaded library, False once building it failed
_pool: ThreadPoolExecutor | None = None


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker, a fork-started pool) has none of the parent's pool
    # threads, and a lock the parent held at the fork stays held: start both afresh.
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def cpu_tag() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        # x86: model name and flags; ARM: CPU implementer / part and Features
        keys = ("model name", "flags", "Features", "CPU implementer", "CPU architecture",
                "CPU part")
        keep = []
        for ln in lines:
            if ln.startswith(keys) and ln.split(":")[0].strip() not in [k.split(":")[0].strip()
                                                                      for k in keep]:
                keep.append(ln)
        return "\n".join(keep)
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    """``$PSA_DIST_CACHE``, else ``~/.cache/psa_dist``, else (a read-only home, as in some
    containers) a directory of this user's in the temp dir."""
    if os.environ.get("PSA_DIST_CACHE"):
        return Path(os.environ["PSA_DIST_CACHE"])
    home = Path.home() / ".cache"
    if os.access(home if home.is_dir() else Path.home(), os.W_OK):
        return home / "psa_dist"
    return Path(tempfile.gettempdir()) / f"psa_dist-{os.getuid()}"


def _private_dir(path: Path) -> None:
    """Create ``path`` (mode 700) if needed; refuse one that another user could have planted a
    library in (a shared temp dir)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{path}: not a directory of this user's that only it can write "
                           f"(owner uid {st.st_uid}, mode {oct(st.st_mode & 0o777)}); set "
                           f"PSA_DIST_CACHE to one")


def library_path() -> Path:
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, platform.machine(),
                                    cpu_tag()]).encode()).hexdigest()[:16]
    return cache_dir() / f"pair_l1-{key}.so"


def build(path: Path) -> None:
    """Compile the kernel into ``path`` atomically (several processes may build at once)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed on {SOURCE}:\n{proc.stderr.strip()[-1500:]}")
    # core/ imports nothing of the project (docs/design.md), so not util.atomic: the same steps
    # here, the library's bytes on disk before the name points at them
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load():
    """The kernel library, building it if needed; None where it cannot be had (reported once)."""
    global _lib
    if _lib is not None:
        return _lib or None
    with _lock:
        if _lib is not None:
            return _lib or None
        if os.environ.get("PSA_DIST_NATIVE", "1") == "0":
            _lib = False
            return None
        try:
            path = library_path()
            _private_dir(path.parent)
            if not path.is_file():
                build(path)
            lib = ctypes.CDLL(str(path))
            lp, i = ctypes.c_void_p, ctypes.c_long
            lib.pair_mean_l1.restype = lib.pair_mean_l1_backward.restype = None
            lib.pair_mean_l1.argtypes = [lp, i, i, i, i, lp, i, lp, i, i]
            lib.pair_mean_l1_backward.argtypes = [lp, i, i, i, i, lp, i, lp, lp, lp]
            lib.chebyshev_walk.restype = None
            lib.chebyshev_walk.argtypes = [lp, lp, lp, lp, lp, lp, i, i, i, i, lp, i, i, i]
            _lib = lib
        except (OSError, RuntimeError) as e:
            print(f"[psa_dist.native] the C kernels are unavailable, using torch ops "
                  f"(same results, slower): {e}", file=sys.stderr, flush=True)
            _lib = False
    return _lib or None


def available() -> bool:
    return load() is not None


def serves(t: torch.Tensor) -> bool:
    """Whether the kernels take ``t`` (float32 on a CPU, and a library to run them); callers use
    torch ops otherwise (a GPU, float64 as in the tests' references, no compiler)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and available()


def _check(buf: torch.Tensor, start: int, n: int, shifts) -> None:
    if buf.device.type != "cpu" or buf.dtype != torch.float32 or not buf.is_contiguous() \
            or buf.dim() != 3:
        raise ValueError(f"pair_mean_l1: needs a contiguous (B, D, L) float32 CPU tensor, got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    lo, hi = min([0, *shifts]), max([0, *shifts])
    if start + lo < 0 or start + n + hi > buf.shape[-1]:
        raise ValueError(f"pair_mean_l1: shifts {lo}..{hi} from [{start}, {start + n}) leave the "
                         f"buffer of length {buf.shape[-1]}")


def _parallel(tasks: list) -> None:
    """Run the callables in ``tasks`` at once: the first in this thread, the others on the pool
    (ctypes calls release the GIL); callers make one task per thread they want."""
    global _pool
    if len(tasks) == 1:
        tasks[0]()
        return
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                       thread_name_prefix="psa-native")
    futures = [_pool.submit(t) for t in tasks[1:]]
    try:
        tasks[0]()          # this thread does its share instead of waiting idle
        for f in futures:
            f.result()
    finally:    # never return (or unwind on Ctrl-C) while a thread still writes a caller's tensor
        wait(futures)


def _lib_or_raise():
    lib = load()
    if lib is None:
        raise RuntimeError("the C kernels of psa_dist.native are unavailable")
    return lib


def pair_mean_l1(buf: torch.Tensor, start: int, n: int, shifts) -> torch.Tensor:
    """``out[b, k, p] = mean_d |buf[b, d, start + p] - buf[b, d, start + p + shifts[k]]|``.

    buf (B, D, L) float32 contiguous on the CPU, with every index read inside it; returns (B, K, n).
    The threads split the pixels. Raises RuntimeError where the kernel is unavailable (callers
    check :func:`available`)."""
    lib = _lib_or_raise()
    _check(buf, start, n, shifts)
    b, d, length = buf.shape
    k = len(shifts)
    out = buf.new_empty((b, k, n))
    if not (b and k and n):
        return out
    q = (ctypes.c_long * k)(*shifts)
    threads = max(1, min(torch.get_num_threads(), -(-n // BLOCK)))
    step = -(-(-(-n // threads)) // BLOCK) * BLOCK
    xs, os_ = [buf[i].data_ptr() for i in range(b)], [out[i].data_ptr() for i in range(b)]

    def task(p0, p1):
        def run():
            for x, o in zip(xs, os_):
                lib.pair_mean_l1(x, length, d, start, n, q, k, o, p0, p1)
        return run

    _parallel([task(p0, min(p0 + step, n)) for p0 in range(0, n, step)])
    return out


def pair_mean_l1_backward(buf: torch.Tensor, start: int, n: int, shifts,
                          grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``sum(pair_mean_l1(buf, ...) * grad)`` with respect to ``buf``, (B, D, L);
    grad (B, K, n), zero where a partner is not a real pixel. The threads split the channels."""
    lib = _lib_or_raise()
    _check(buf, start, n, shifts)
    b, d, length = buf.shape
    k = len(shifts)
    if tuple(grad.shape) != (b, k, n):
        raise ValueError(f"pair_mean_l1_backward: grad {tuple(grad.shape)}, expected {(b, k, n)}")
    if grad.device.type != "cpu":
        raise ValueError(f"pair_mean_l1_backward: grad on {grad.device}, needs the CPU")
    ga, gb = buf.new_zeros((b, d, n)), buf.new_zeros((b, d, length))
    if not (b and d and k and n):
        return gb
    q = (ctypes.c_long * k)(*shifts)
    g = (grad / d).to(torch.float32).contiguous()
    threads = max(1, min(torch.get_num_threads(), b * d))
    per = -(-(b * d) // threads)
    x0, g0, ga0, gb0 = buf.data_ptr(), g.data_ptr(), ga.data_ptr(), gb.data_ptr()

    def task(lo, hi):
        def run():
            for i in range(lo // d, (hi - 1) // d + 1):     # images overlapping channels [lo, hi)
                c0, c1 = max(lo - i * d, 0), min(hi - i * d, d)
                row = i * d + c0                               # float32: 4 bytes
                lib.pair_mean_l1_backward(x0 + 4 * row * length, length, c1 - c0, start, n, q, k,
                                          g0 + 4 * i * k * n, ga0 + 4 * row * n,
                                          gb0 + 4 * row * length)
        return run

    _parallel([task(lo, min(lo + per, b * d)) for lo in range(0, b * d, per)])
    gb[..., start:start + n] += ga
    return gb


def chebyshev_walk(maps: torch.Tensor, w2: torch.Tensor, coef, degrees, start: int, n: int,
                   shifts) -> torch.Tensor:
    """``sum_j coef[j] T_j(T) y0`` for each image up to its own degree (random_walk's truncated
    walk). maps (B, C, L): y0 in the padded flat layout, overwritten; w2 (B, K, n): twice the
    weights; returns (B, C, n), the grid rows. The threads split the images: each image's whole walk
    runs in one thread, with no synchronisation per step."""
    lib = _lib_or_raise()
    _check(maps, start, n, shifts)
    b, c, length = maps.shape
    k = len(shifts)
    if w2.dtype != torch.float32 or not w2.is_contiguous() or tuple(w2.shape) != (b, k, n) \
            or w2.device.type != "cpu" or len(degrees) != b:
        raise ValueError(f"chebyshev_walk: weights {tuple(w2.shape)} {w2.dtype} and {len(degrees)} "
                         f"degrees for maps {tuple(maps.shape)}")
    top = max(degrees, default=0)
    if len(coef) <= top:
        raise ValueError(f"chebyshev_walk: {len(coef)} coefficients for degree {top}")
    other, acc = torch.zeros_like(maps), maps.new_empty((b, c, n))
    if not (b and c and n):
        return acc
    q = (ctypes.c_long * k)(*shifts)
    cf = (ctypes.c_float * (top + 1))(*coef[:top + 1])
    dg = (ctypes.c_long * b)(*degrees)
    ptrs = (maps.data_ptr(), other.data_ptr(), acc.data_ptr(), w2.data_ptr())
    threads = max(1, min(torch.get_num_threads(), b))
    per = -(-b // threads)

    def task(lo, hi):
        return lambda: lib.chebyshev_walk(*ptrs, cf, dg, c, length, start, n, q, k, lo, hi)

    _parallel([task(lo, min(lo + per, b)) for lo in range(0, b, per)])
    return acc
