"""Per-rank memory and speed of DDP, FSDP and FSDP + activation checkpointing (issue 22).

    python bench/bench_fsdp.py [--steps 3] [--block-size 1024] [--nproc 2] [--preset gpt2-small]

Launches ``torchrun --nproc_per_node=N`` once per configuration (gloo on CPU, NCCL on CUDA),
each rank training the preset's GPT (fp32, one sequence per rank, torch AdamW) for a few steps,
and prints a markdown table:

* state: the bytes this rank holds for parameters + gradients + optimizer state, counted from
  the tensors themselves (the local shards under FSDP);
* activations: the tensor bytes the forward leaves for the backward, on the last step: on CPU
  the profiler's allocation events over the forward (allocations minus frees: exact, whatever
  malloc keeps resident), on CUDA the growth of memory_allocated;
* peak: the peak resident set of the process (ru_maxrss; CPU) or max_memory_allocated (CUDA);
* steps/s: median over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fastgpt.profiling import allocations

CONFIGS = {"ddp": [], "fsdp": ["fsdp"], "fsdp+ac": ["fsdp", "block"],
           "fsdp+selective": ["fsdp", "selective"]}


def _forward(model, x, device: torch.device):
    """(loss, tensor bytes the forward left allocated); see the module docstring."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        _, loss = model(x, x)
        return loss, torch.cuda.memory_allocated(device) - before
    (_, loss), deltas = allocations(lambda: model(x, x))
    return loss, sum(deltas)


def _state_bytes(model, optimizer) -> int:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    n = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    n += sum(local(p.grad).numel() * local(p.grad).element_size()
             for p in model.parameters() if p.grad is not None)
    n += sum(local(v).numel() * local(v).element_size() for s in optimizer.state.values()
             for v in s.values() if torch.is_tensor(v))
    return n


def _wrap(model, how: list[str], device, world_size: int):
    from fastgpt import recompute, sharding
    for mode in set(how) & {"block", "selective"}:
        recompute.apply(model, mode)
    if "fsdp" in how:
        sharding.shard(model, device, world_size, torch.float32)
        return model
    model = model.to(device)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def rank_main(args) -> None:
    """One rank's run; writes rank<N>.json in --results."""
    from fastgpt import config as cfgmod
    from fastgpt.model import build_model
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    mcfg, _ = cfgmod.preset(args.preset, block_size=args.block_size)
    torch.manual_seed(0)
    model = _wrap(build_model("gpt", mcfg), args.config.split(",") if args.config else [],
                  device, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, mcfg.vocab_size, (1, args.block_size), device=device)
    times, activations = [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, activations = _forward(model, x, device)
        loss.backward()
        optimizer.step()
        state = _state_bytes(model, optimizer)   # gradients still held
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {"rank": rank, "state": state, "activations": activations, "peak": peak,
           "steps_per_s": 1 / statistics.median(times[1:] or times)}
    (Path(args.results) / f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def launch(args, name: str, how: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--standalone", __file__, "--rank-main", "--config", ",".join(how),
           "--steps", str(args.steps), "--block-size", str(args.block_size),
           "--preset", args.preset]
    with tempfile.TemporaryDirectory() as results:
        out = subprocess.run(cmd + ["--results", results], capture_output=True, text=True,
                             check=False)
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(results).glob("rank*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # DDP rebuilds its gradient buckets in its second forward (a parameter-sized buffer): the
    # activations are read on the last step, so at least 3
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--config", default="")
    p.add_argument("--results", default="")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        return rank_main(args)
    from fastgpt.device import describe
    print(f"{args.preset}, block {args.block_size}, 1 sequence per rank, fp32, {args.nproc} "
          f"processes, {args.steps} steps; {describe(torch.device('cpu'))}, torch "
          f"{torch.__version__}")
    print("| config | state (params+grads+AdamW) per rank | activations per rank | peak per rank "
          "| steps/s |\n|---|---|---|---|---|")
    rows = {name: launch(args, name, how) for name, how in CONFIGS.items()}
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    for name, ranks in rows.items():
        worst = lambda k: max(r[k] for r in ranks)
        print(f"| {name} | {gib(worst('state'))} | {gib(worst('activations'))} | "
              f"{gib(worst('peak'))} | {min(r['steps_per_s'] for r in ranks):.3f} |")
    ddp, fsdp = rows["ddp"], rows["fsdp"]
    share = max(r["state"] for r in fsdp) / (max(r["state"] for r in ddp) / args.nproc)
    cut = 1 - max(r["activations"] for r in rows["fsdp+ac"]) / max(r["activations"] for r in fsdp)
    print(f"\nFSDP state per rank = {share:.3f} x (DDP's / {args.nproc}); activation "
          f"checkpointing cuts activations by {100 * cut:.0f}%")


if __name__ == "__main__":
    main()
