"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``compile_for_arch`` runs Triton's full pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin) for a
target such as sm_80 or sm_90 and reports what the kernel costs the hardware: registers per
thread, bytes spilled to local memory and shared memory per block. ``occupancy_warps_per_sm``
turns that into resident warps per SM. Both feed the tests (zero spills, shared memory within
the limit) and ``fastgpt compile-report``.

Resource figures come from the ptxas log (``-v``: registers, spill stores/loads), which Triton
prints when ``knobs.nvidia.dump_ptxas_log`` is on; we capture it with Triton's cache bypassed so
ptxas really runs. ``parse_ptxas_log`` is the one reader of such logs: the CUDA extension's
nvcc ``-Xptxas -v`` build log goes through it too (``fastgpt compile-report --ext-log``,
.ci/check_cuda_ext.sh), as do the register rounding (``warps_by_registers``) and the
shippability rules (``check``). Shared memory is Triton's own figure (``metadata.shared``: the
dynamic shared memory the launch asks for).

Convention for kernel modules: a module in ``fastgpt.kernels`` that can be compiled ahead of time
exports ``aot_configs() -> list[AOTConfig]`` (an ``AOTConfig`` is
``(kernel_fn, signature, constexprs, num_warps, num_stages)``, a plain tuple is fine):
``signature`` maps every argument name of the ``@triton.jit`` function to a Triton type string
(``"*fp16"``, ``"i32"``, ``"fp32"``, or ``"constexpr"``), and ``constexprs`` gives the value of each
constexpr argument. As in Triton's ``tools/compile.py``, a type may carry the specialisation the
JIT would make at run time: ``"*fp16:16"`` (16-byte aligned pointer), ``"i32:16"`` (multiple of 16),
``"i32:1"`` (equal to 1, e.g. a unit stride, compiled as a constant). The configs listed are the
ones the launchers ship on GPU; kernel modules do not import this module (layering).

This must run in a process where TRITON_INTERPRET is not set (the interpreter replaces
``@triton.jit`` functions with Python ones that cannot be compiled). ``fastgpt compile-report``
(fastgpt/tools/compile_report.py) therefore runs it in worker subprocesses, one per
architecture; the tests use those workers too.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from fastgpt.ops._triton import interpreting

# Per-SM and per-block limits by compute capability (CUDA programming guide, "Technical
# specifications per compute capability"): registers per SM, shared memory per SM and the most
# one block may opt into, and resident warps per SM.
ARCH_LIMITS = {
    80: dict(regs_per_sm=65536, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
             max_warps_per_sm=64, max_regs_per_thread=255),
    90: dict(regs_per_sm=65536, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
             max_warps_per_sm=64, max_regs_per_thread=255),
}


class AOTConfig(NamedTuple):
    """One shippable launch of one kernel: what ``aot_configs()`` of a kernel module lists."""
    kernel: Any                   # the @triton.jit function
    signature: dict[str, str]     # argument name -> "*fp16" | "i32" | "fp32" | "constexpr" ...
    constexprs: dict[str, Any]    # constexpr argument name -> value
    num_warps: int
    num_stages: int


@dataclass
class KernelResources:
    kernel: str
    arch: int
    config: dict = field(default_factory=dict)   # constexprs + num_warps + num_stages
    registers: int = 0          # per thread
    spill_bytes: int = 0        # spill stores + spill loads reported by ptxas
    shared_bytes: int = 0       # dynamic shared memory per block


class PtxasFunction(NamedTuple):
    """One function of a ``ptxas -v`` log (Triton's or nvcc's ``-Xptxas -v``: the same ptxas)."""
    name: str                # as ptxas prints it (mangled, for C++)
    arch: int                # 80 for sm_80
    entry: bool              # a kernel; False for a device function ptxas did not inline
    registers: int           # per thread (0 for a device function: its kernel's figure counts it)
    spill_stores: int        # bytes
    spill_loads: int         # bytes
    stack_bytes: int         # stack frame
    shared_bytes: int        # static shared memory ("bytes smem"; Triton's is dynamic)

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)[a-z]?'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> list[PtxasFunction]:
    """Every function in a ``ptxas -v`` log, in log order. ptxas prints, per kernel and arch,
    ``Compiling entry function '<name>' for 'sm_XX'``, ``Function properties for <name>``, the
    stack/spill line, then ``Used N registers, ... [M bytes smem]``; a device function it did not
    inline gets only the properties and stack/spill lines (its arch: the nearest kernel's)."""
    out: list[PtxasFunction] = []
    arch, entry, props, frame = None, None, None, (0, 0, 0)
    pending: list[tuple] = []            # device functions seen before any arch
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry, arch, props, frame = m.group(1), int(m.group(2)), None, (0, 0, 0)
            out += [PtxasFunction(n, arch, False, 0, *f) for n, f in pending]
            pending = []
        elif m := _PROPERTIES.search(line):
            props = m.group(1)
        elif m := _FRAME.search(line):
            stack, stores, loads = map(int, m.groups())
            if props is not None and props == entry:
                frame = (stores, loads, stack)
            elif props is not None:          # a device function
                f = (stores, loads, stack, 0)
                if arch is None:
                    pending.append((props, f))
                else:
                    out.append(PtxasFunction(props, arch, False, 0, *f))
            props = None
        elif (m := _REGS.search(line)) and entry is not None:
            smem = _SMEM.search(line)
            out.append(PtxasFunction(entry, arch, True, int(m.group(1)), *frame,
                                     int(smem.group(1)) if smem else 0))
            entry, frame = None, (0, 0, 0)
    return out


def _apply_hints(fn, signature: dict[str, str], constexprs: dict):
    """Split ``"type:hint"`` entries into plain types, constants (hint 1) and divisibility attrs."""
    plain, consts, attrs = {}, dict(constexprs), {}
    for name, ty in signature.items():
        ty, _, hint = ty.partition(":")
        if hint == "1":
            plain[name], consts[name] = "constexpr", 1
        else:
            plain[name] = ty
            if hint == "16":
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
            elif hint:
                raise ValueError(f"signature hint {hint!r} for {name}: only 1 and 16 are valid")
    return plain, consts, attrs


def compile_for_arch(fn: Callable, signature: dict[str, str], constexprs: dict, arch: int,
                     num_warps: int, num_stages: int) -> KernelResources:
    """Compile ``fn`` for ``sm_<arch>`` without a GPU and report its resource use."""
    if interpreting():
        raise RuntimeError("fastgpt.tools.aot needs TRITON_INTERPRET unset: interpreted kernels "
                           "cannot be compiled. `fastgpt compile-report` compiles in clean "
                           "subprocesses.")
    # triton here, not at the top (~0.5 s): `fastgpt compile-report`'s parent process, which
    # only starts the workers and reads their rows, never needs it
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    plain, consts, attrs = _apply_hints(fn, signature, constexprs)
    src = triton.compiler.ASTSource(fn=fn, signature=plain, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    log = io.StringIO()
    # Bypass the cache so ptxas runs and prints its -v log, which Triton sends to stdout.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=target,
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    functions = parse_ptxas_log(log.getvalue())
    if not any(f.entry for f in functions):
        raise RuntimeError(f"could not read registers/spills from the ptxas log:\n{log.getvalue()}")
    registers = max(f.registers for f in functions)
    spills = max(f.spill_bytes for f in functions)    # a device function's spills count too
    config = dict(constexprs, num_warps=num_warps, num_stages=num_stages)
    return KernelResources(kernel=fn.__name__, arch=arch, config=config, registers=registers,
                           spill_bytes=spills, shared_bytes=int(compiled.metadata.shared))


def warps_by_registers(registers: int, arch: int) -> int:
    """Resident warps per SM that ``registers`` per thread allow, whatever the block size."""
    lim = ARCH_LIMITS[arch]
    # registers are allocated per warp in units of 256 (8 per thread, rounded up)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return min(lim["regs_per_sm"] // regs_per_warp, lim["max_warps_per_sm"])


def occupancy_warps_per_sm(res: KernelResources, arch: int) -> int:
    """Resident warps per SM for a launch of ``res`` (0 if one block does not fit at all)."""
    lim = ARCH_LIMITS[arch]
    warps = res.config.get("num_warps", 4)
    if res.shared_bytes > lim["smem_per_block"] or res.registers > lim["max_regs_per_thread"]:
        return 0
    blocks_by_regs = warps_by_registers(res.registers, arch) // warps     # whole blocks
    blocks_by_smem = lim["smem_per_sm"] // res.shared_bytes if res.shared_bytes else 10 ** 9
    blocks_by_warps = lim["max_warps_per_sm"] // warps
    return min(blocks_by_regs, blocks_by_smem, blocks_by_warps) * warps


def check(res: KernelResources) -> list[str]:
    """The problems that make a config unshippable: spills, too much shared memory."""
    lim = ARCH_LIMITS[res.arch]
    problems = []
    if res.spill_bytes:
        problems.append(f"spills {res.spill_bytes} bytes")
    if res.shared_bytes > lim["smem_per_block"]:
        problems.append(f"needs {res.shared_bytes} bytes of shared memory, sm_{res.arch} allows "
                        f"{lim['smem_per_block']} per block")
    return problems
