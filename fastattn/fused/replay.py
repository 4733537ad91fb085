"""Compile a manifest of planned launches into the Triton cache, with triton alone (no torch).

``python fastattn/fused/replay.py MANIFEST [--jobs N]`` (run as a script, by path) is the compile
half of :mod:`fastattn.fused.precompile`. It needs only triton and fastattn's kernel files, so it
runs in any interpreter that has the triton of the GPU machine the cache is for (the cache key
includes triton's own build, which differs between Python versions): it imports the kernel
modules under their real names (``fastattn.fused.kernels.*``) without running fastattn's package
code, which imports torch. Each launch becomes a ``JITFunction.warmup`` call with stand-in
tensors (a dtype and a data pointer's remainder modulo 16: all that triton's specialisation reads)
through a compile-only driver for the manifest's target, so the cache keys are the ones the
launches look up on the GPU.

Prints one JSON object: launches, kernels (distinct specialisations: launches that differ only in
values triton does not specialise on share one), how many were compiled and how many were found in
the cache (counted by triton's compilation listener), and the cache directory.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import json
import sys
import types
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../fastattn


class _Dtype:
    """A torch dtype as triton's specialisation reads it: its name, "torch.float16". One object
    per name (:func:`_dtype`): triton's native specialisation caches by the dtype object, so a
    short-lived one whose id is reused would be taken for another dtype."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__


_DTYPES: dict[str, _Dtype] = {}


def _dtype(name: str) -> _Dtype:
    return _DTYPES.setdefault(name, _Dtype(name))


class StandIn:
    """A tensor argument as triton's specialisation reads it: dtype and data pointer."""

    def __init__(self, dtype: str, offset: int = 0):
        self.dtype = _dtype(dtype)
        self._ptr = offset

    def data_ptr(self) -> int:
        return self._ptr


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver when it only compiles (warmup): the
    device (one key per target, so triton's per-device binders never mix targets), a stream and
    the target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"aot-sm_{arch}"

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def compile_only(arch: int):
    """Make triton's active driver a :class:`CompileOnlyDriver` for sm_<arch> for the duration."""
    from triton.runtime import driver

    previous = driver._active  # DriverConfig.reset_active would create the real driver: no GPU here
    driver.set_active(CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


def kernel_function(module: str, kernel: str):
    """The @triton.jit function fastattn.fused.kernels.<module>.<kernel>; in a process that has not
    imported fastattn (this file run as a script), imported without running the package code of
    fastattn or fastattn.fused (torch), under the same module names."""
    if "fastattn" not in sys.modules:  # run as a script: stand-in packages, the real kernel modules
        for pkg, path in (("fastattn", PACKAGE_ROOT), ("fastattn.fused", PACKAGE_ROOT / "fused")):
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            sys.modules[pkg] = stub
    return getattr(importlib.import_module(f"fastattn.fused.kernels.{module}"), kernel)


def arguments(entry: dict) -> dict:
    """The launch's keyword arguments with stand-ins for its tensors."""
    args = {}
    for name, value in entry["args"].items():
        args[name] = StandIn(value["tensor"], value.get("offset", 0)) if isinstance(value, dict) else value
    return {**args, **entry["constexprs"]}


def warmup(entry: dict, arch: int):
    """Compile one manifest entry for sm_<arch> through triton's launch path; the CompiledKernel."""
    fn = kernel_function(entry["module"], entry["kernel"])
    with compile_only(arch):
        return fn.warmup(
            **arguments(entry), grid=tuple(entry["grid"]), num_warps=entry["num_warps"],
            num_stages=entry["num_stages"],
        )  # fmt: skip


def _compile_chunk(job: tuple[list[dict], int]) -> dict:
    from triton import knobs

    entries, arch = job
    hits = {"compiled": 0, "cached": 0}

    def listener(*, cache_hit: bool, **_):
        hits["cached" if cache_hit else "compiled"] += 1

    knobs.compilation.listener = listener
    for entry in entries:
        warmup(entry, arch)
    return hits


def replay(manifest: dict, jobs: int = 1) -> dict:
    """Compile every launch of `manifest` (distinct kernels once each); the counts."""
    import triton
    from triton import knobs

    arch = manifest["arch"]
    distinct = {}
    for entry in manifest["launches"]:
        key = json.dumps({k: entry[k] for k in ("module", "kernel", "args", "constexprs", "num_warps", "num_stages")})
        distinct.setdefault(key, entry)
    entries = list(distinct.values())
    chunks = [(entries[i::jobs], arch) for i in range(jobs) if entries[i::jobs]]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            counts = list(pool.map(_compile_chunk, chunks))
    else:
        counts = [_compile_chunk(chunk) for chunk in chunks]
    return {
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "arch": arch,
        "launches": len(manifest["launches"]),
        "kernels": sum(c["compiled"] + c["cached"] for c in counts),
        "compiled": sum(c["compiled"] for c in counts),
        "cached": sum(c["cached"] for c in counts),
        "cache_dir": str(knobs.cache.dir),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="compiling processes")
    args = parser.parse_args(argv)
    print(json.dumps(replay(json.loads(args.manifest.read_text()), max(1, args.jobs))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
