"""
Runtime helpers shared by every script: paths, printing and rank reductions, the device and the precision
policy (resolve_precision), distributed init/cleanup, seeding, wandb, peak FLOP/s tables and a locked
download helper. Reading user files is nanochat/files.py's.
"""

import os
import time
import random
import functools
import logging
import urllib.request

import torch
import torch.distributed as dist

from nanochat.files import install_error_handler

logger = logging.getLogger("nanochat")


def init_script():
    """A script's entry point calls this first: the library's log lines (INFO, the bare message) go to stderr,
    other libraries' only from WARNING up (httpx would log every request), and a bad input file ends the script
    with its one-line error instead of a traceback. Importing nanochat configures nothing."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    install_error_handler()

# -----------------------------------------------------------------------------
# Paths

def get_base_dir():
    """Where artifacts live: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat (created on demand)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_data_dir():
    """The offline data mirror ($NANOCHAT_DATA_DIR, laid out like shared/data), or None when unset."""
    d = os.environ.get("NANOCHAT_DATA_DIR")
    if not d:
        return None
    d = os.path.abspath(os.path.expanduser(d))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"NANOCHAT_DATA_DIR={d} is not a directory; point it at a data mirror or unset it")
    return d

# -----------------------------------------------------------------------------
# Printing and process info

def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) as torchrun sets them in the environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (an identity on one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(value, device):
    """Mean of a python float over ranks."""
    if not is_distributed():
        return value
    return all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=device)).item() / dist.get_world_size()


def any_rank(flag, device):
    """True if `flag` is True on any rank (e.g. 'this rank ran out of data')."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

# -----------------------------------------------------------------------------
# Device and precision

def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_MIN_SPEEDUP = 1.5  # below this, bf16's rounding is not worth it: the elementwise work stays the same


@functools.cache
def probe_cpu_bf16_speedup(m=1024, k=256, n=1024, seconds=0.03):
    """How much faster this CPU multiplies in bf16 than fp32 at a training-like shape (native bf16 dot
    products: 2-10x; emulated: slower). Best of a few interleaved short windows, about 0.2 s, measured once
    per process. Draws its matrices from a private generator: the global RNG, which the model is initialised
    from next, must not depend on whether the policy ran the probe."""
    best, gen = {}, torch.Generator().manual_seed(0)
    mats = {dt: (torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt))
            for dt in (torch.float32, torch.bfloat16)}
    for _ in range(3):
        for dt, (a, b) in mats.items():
            a @ b  # warm-up (and first-touch of the output pages)
            iters, t0 = 0, time.perf_counter()
            while (dt_s := time.perf_counter() - t0) < seconds or iters < 2:
                a @ b
                iters += 1
            best[dt] = min(best.get(dt, float("inf")), dt_s / iters)
    return best[torch.float32] / best[torch.bfloat16]


def cpu_bf16_is_fast():
    """(bf16 pays on this CPU?, why). x86 CPUs that report AMX or AVX512-BF16 multiply bf16 natively, several
    times faster than fp32: decided from the flags, so the choice never depends on how busy the machine is
    (a timing probe under load once read 1.0x on such a CPU and silently trained a different run). Other CPUs
    (ARM with or without bf16 dot products, older x86) are measured by the probe."""
    for flag, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        if getattr(torch.cpu, flag, lambda: False)():
            return True, f"CPU reports {name} (native bf16 matmul)"
    ratio = probe_cpu_bf16_speedup()
    fast = ratio >= BF16_MIN_SPEEDUP
    return fast, f"CPU bf16 matmul measured {ratio:.1f}x fp32 ({'>=' if fast else '<'} {BF16_MIN_SPEEDUP}x)"


def resolve_precision(device_type, dtype=None, compile=None, training=True, verbose=True):
    """The precision policy, the one place it is decided: (compute dtype, whether to torch.compile, reason).
    `dtype` and `compile` are the --dtype / --compile flags (None or "" = decide); $NANOCHAT_DTYPE is the user's
    dtype where --dtype is not given (read here, never written: the caller hands the dtype to the model).
    Training: CUDA bf16 on SM80+ (fp32 below), compiled. CPU: bf16, compiled (inductor fuses the casts around
    every op), where bf16 matmul is native (cpu_bf16_is_fast), else fp32 eager (compile buys fp32 little on a
    CPU). MPS: fp32 eager. Inference (training=False): the same on CUDA and MPS, but fp32 on a CPU (exact; a
    decode step is too small for bf16 to pay), and never compiled (a script that compiles its decode step has
    its own flag). Weights and optimizer state stay fp32. Draws no random numbers: the policy and an explicit
    --dtype giving the same choice train the same model."""
    choice = dtype or os.environ.get("NANOCHAT_DTYPE") or None
    if choice and choice not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {choice!r} (from --dtype or NANOCHAT_DTYPE)")
    if choice:
        out_dtype, reason = DTYPES[choice], ("--dtype" if dtype else "$NANOCHAT_DTYPE") + " set explicitly"
    elif device_type == "cuda":
        fast = torch.cuda.get_device_capability()[0] >= 8
        out_dtype = torch.bfloat16 if fast else torch.float32
        reason = "CUDA compute capability " + (">= 8.0" if fast else "< 8.0 has no fast bf16")
    elif device_type == "cpu" and training:
        fast, reason = cpu_bf16_is_fast()
        out_dtype = torch.bfloat16 if fast else torch.float32
    else:
        out_dtype, reason = torch.float32, f"default {'for inference ' if not training else ''}on {device_type}"
    if compile is None:
        out_compile = training and (device_type == "cuda" or (device_type == "cpu" and out_dtype == torch.bfloat16))
    else:
        out_compile, reason = bool(compile), reason + "; --compile set explicitly"
    if verbose:
        print0(f"precision: {str(out_dtype).removeprefix('torch.')}, compile={int(out_compile)} ({reason})")
    return out_dtype, out_compile, reason


def enable_tf32():
    """fp32 matmuls and convolutions on CUDA run in TF32 (the fp32 work that remains: optimizer math, fp32 runs).
    torch >= 2.9 sets this per backend through `fp32_precision` and deprecates the older allow_tf32 flags."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compute_init(device_type="", seed=42):
    """Set up the device, seeds and (under torchrun) the process group: NCCL on CUDA, gloo on CPU.
    Returns (is_distributed, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type=cuda was asked for but no CUDA GPU is visible")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("--device-type=mps was asked for but MPS is not available")
    random.seed(seed)
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        enable_tf32()
    is_dist, rank, local_rank, world_size = get_dist_info()
    device = torch.device("cuda", local_rank) if is_dist and device_type == "cuda" else torch.device(device_type)
    if is_dist:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        dist.barrier()
    if rank == 0:
        logger.info(f"device: {device} | world size: {world_size}")
    return is_dist, rank, local_rank, world_size, device


def compute_cleanup():
    if is_distributed():
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def get_max_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:  # CPU: peak resident set size of this process
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:
        return 0

# -----------------------------------------------------------------------------
# Experiment logging

class DummyWandb:
    """Stands in for a wandb run when logging is off (--run=dummy) or on non-zero ranks."""
    def log(self, *args, **kwargs):
        pass

    finish = log


def get_wandb(run, project, config, master_process=True):
    """wandb run (honours WANDB_MODE=offline), or a no-op for --run=dummy and non-master ranks."""
    if run == "dummy" or not master_process:
        return DummyWandb()
    import wandb
    return wandb.init(project=project, name=run, config=config)

# -----------------------------------------------------------------------------
# Peak FLOP/s (datasheet, dense bf16, per GPU) and a measured matmul peak

_PEAK_FLOPS = [  # substring of the device name -> bf16 FLOP/s; more specific names first
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H200", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]


def get_datasheet_peak_flops(device):
    """Datasheet bf16 peak of a CUDA device, or inf when unknown (MFU then shows 0)."""
    if device.type != "cuda":
        return float("inf")
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_FLOPS:
        if key in name:
            return flops
    return float("inf")


def measure_matmul_peak(device, dtype=torch.float32, n=None, seconds=1.0, windows=4):
    """Achieved FLOP/s of a square matmul on this device (the denominator of measured MFU): the best of
    several short windows, so contention from other processes does not lower it and inflate every MFU."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(windows):
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 2 == 0:
                synchronize(device)
                if time.perf_counter() - t0 > seconds / windows:
                    break
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best

# -----------------------------------------------------------------------------
# Downloads

def download_file_with_lock(url, path, postprocess=None, timeout=60):
    """Fetch `url` to `path` once, under a file lock (concurrent ranks wait), via a temp file (a crash leaves
    no half file under the real name); `postprocess(path)` (e.g. unzip) runs under the same lock."""
    from filelock import FileLock
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.exists(path):
            return path
        tmp = path + ".tmp"
        print0(f"downloading {url} -> {path}")
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
        if postprocess is not None:
            postprocess(path)
    return path

# -----------------------------------------------------------------------------
# Misc

def parse_bool(s):
    """argparse type for flags like --compile=0/1/true/false."""
    if isinstance(s, bool):
        return s
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (0/1/true/false), got {s!r}")


def format_eta(seconds):
    seconds = max(0, int(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
