"""The training loop: nanoGPT's recipe (AdamW, warmup + cosine schedule, gradient clipping,
periodic train/val estimates) with safe checkpoints, exact resume and mixed precision.

Iteration ``it`` runs 0..max_iters: the loss is estimated at every eval_interval (and at the
last iteration), a checkpoint is written after each estimate, then one optimizer step is taken;
the run ends after the estimate at ``max_iters``. A checkpoint therefore holds the state at the
start of iteration ``iter_num``, and ``resume`` continues from there bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fastgpt import config as cfgmod
from fastgpt import distributed, ops
from fastgpt.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from fastgpt.data import CharTokenizer, TextDataset, read_text
from fastgpt.device import resolve_device
from fastgpt.errors import FastGPTError
from fastgpt.generate import generate
from fastgpt.model import build_model
from fastgpt.optim import flat_adamw_or_none, make_optimizer, optimizer_groups
from fastgpt.precision import (LowPrecisionCopy, autocast, grad_scaler, parse_dtype,
                               resolve_dtype_name, uses_working_copy)

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
EVAL_GROUP = 4   # eval batches per forward pass


@dataclass
class RunOptions:
    """Everything `fastgpt train` takes besides the preset's model/training fields."""
    model: str = "gpt"
    preset: Optional[str] = None           # None: baby on CPU, shakespeare-char on CUDA
    data: Optional[str] = None             # None: the bundled tiny Shakespeare
    device: str = "auto"
    dtype: str = "auto"                    # see fastgpt.precision; float32 = exact fp32
    compile: bool = False
    out_dir: str = "out"
    resume: bool = False
    overwrite: bool = False
    seed: int = 1337
    sample_chars: int = 300
    progress: bool = True
    overrides: dict = field(default_factory=dict)   # preset fields, e.g. {"max_iters": 100}


@dataclass
class RunResult:
    iter_num: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    wall_time: float
    out_dir: str
    sample: str = ""
    rank: int = 0                          # under torchrun only rank 0 should print the result


def lr_at(it: int, t: cfgmod.TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    if it < t.warmup_iters:
        return t.learning_rate * (it + 1) / (t.warmup_iters + 1)
    if it > t.lr_decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def check_backends(model_kind: str, m: cfgmod.GPTConfig) -> None:
    """Fail before training starts when a named backend does not exist."""
    loss_op = "linear_cross_entropy" if model_kind == "gpt" else "cross_entropy"
    for op, name in (("attention", m.attention), (loss_op, m.cross_entropy),
                     ("embedding", m.embedding), ("transformer_block", m.transformer_block)):
        if name is not None:
            ops.registry.get(op, name)


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FastGPTError(f"out dir {str(out_dir)!r} is not writable: {e.strerror}") from None
    ckpt = out_dir / CHECKPOINT_NAME
    if resume and not ckpt.exists():
        raise FastGPTError(f"--resume given but {str(ckpt)!r} does not exist; train without "
                           f"--resume first")
    if not resume and ckpt.exists() and not overwrite:
        raise FastGPTError(f"{str(ckpt)!r} already exists; pass --resume to continue that run, "
                           f"--overwrite to start over, or a different --out-dir")


class MetricsLog:
    """Appends one JSON object per line, flushed at once so a killed run keeps its rows."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        if fresh:
            path.write_text("")

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    # Importing matplotlib allocates enough objects to set off full garbage collections, each a
    # pass over everything torch has created (~0.2 s at the end of a run); it leaves no cyclic
    # garbage worth collecting, so the collector pauses until the PNG is written.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _draw_losses(metrics_path, png_path)
    finally:
        if was_enabled:
            gc.enable()


def _draw_losses(metrics_path: Path, png_path: Path) -> None:
    # A Figure draws itself to PNG without pyplot: no pyplot import, no figure manager, and
    # the caller's matplotlib backend (a notebook's, say) stays as it was
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["iter"] for r in steps], [r["train_loss"] for r in steps], lw=0.8, alpha=0.5,
            label="train (batch)")
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (est.)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (est.)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def _rng_state(device: torch.device, batches: "BatchStream") -> dict:
    state = {"torch": torch.get_rng_state(), **batches.state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, batches: "BatchStream") -> None:
    torch.set_rng_state(state["torch"])
    batches.set_state(state)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _resume_rng(resumed: dict, world: distributed.World, device: torch.device,
                batches: "BatchStream") -> None:
    """Restore the RNG streams of a checkpoint, which holds one state per rank.

    With the world size it was written with, every rank continues its own streams, so the run goes
    on bit for bit. With another world size the batch generator (the same on every rank) still
    continues, so the data order is exact; each rank's own RNG (dropout) is re-seeded from
    (seed, rank, iteration).
    """
    saved_size = resumed.get("world_size", 1)
    if saved_size == world.size:
        _set_rng_state(resumed["rng_ranks"][world.rank] if world.enabled else resumed["rng"],
                       device, batches)
        return
    if world.is_main:
        logging.getLogger("fastgpt").warning(
            f"resuming a {saved_size}-process run with {world.size} process(es): the data order "
            f"continues exactly, dropout randomness is re-seeded")
    batches.set_state(resumed["rng"])
    torch.manual_seed(distributed.rank_seed(resumed.get("seed", 0), world.rank, resumed["iter_num"]))


class BatchStream:
    """Training and eval batches from one generator, in nanoGPT's order: the first training
    batch is drawn before the loop and each next one right after the forward pass that uses
    the previous, so an eval at iteration ``it`` draws after batch ``it`` was fetched. The
    generator starts where the weight initialisation left the global RNG, so with dropout 0 a
    float32 run sees exactly nanoGPT's batches (and, its model and optimizer being the same,
    its losses). The state before the pending draw is kept so a resume can fetch it again.
    """

    def __init__(self, dataset: TextDataset, batch_size: int, device: torch.device,
                 world: distributed.World):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        # every rank draws the same global batch and keeps its own rows
        self.rows = distributed.rank_rows(batch_size, world)
        self.gen = torch.Generator()
        self.gen.set_state(torch.get_rng_state())
        self.pending_state = self.gen.get_state()
        self.pending = None

    def draw(self, split: str):
        return self.dataset.batch(split, self.batch_size, self.gen, self.device, self.rows)

    def prefetch(self) -> None:
        self.pending_state = self.gen.get_state()
        self.pending = self.draw("train")

    def take(self):
        batch = self.pending
        self.pending = None
        return batch

    def state(self) -> dict:
        return {"batch": self.gen.get_state(), "batch_pending": self.pending_state}

    def set_state(self, state: dict) -> None:
        self.gen.set_state(state["batch_pending"])
        self.prefetch()
        self.gen.set_state(state["batch"])


class _Discard:
    """The metrics log of ranks other than 0: only rank 0 writes files."""

    def write(self, **row) -> None:
        pass


def train(opts: RunOptions) -> RunResult:
    """Train a model as ``opts`` says; returns the final losses. Raises FastGPTError on bad input.

    Launched by torchrun with WORLD_SIZE > 1, every rank runs this with DDP (see
    fastgpt.distributed for how the batch splits); otherwise it is a plain single process.
    """
    world = distributed.world_from_env()
    device = distributed.rank_device(resolve_device(opts.device), world)
    with distributed.process_group(world, device):
        return _train(opts, world, device)


def _train(opts: RunOptions, world: distributed.World, device: torch.device) -> RunResult:
    t_start = time.perf_counter()
    dtype = parse_dtype(opts.dtype, device.type)
    out_dir = Path(opts.out_dir)
    prepare_out_dir(out_dir, opts.resume, opts.overwrite)
    ckpt_path = out_dir / CHECKPOINT_NAME
    resumed = load_checkpoint(ckpt_path) if opts.resume else None

    text = read_text(opts.data)
    tokenizer = CharTokenizer.from_text(text)
    preset_name = opts.preset or ("shakespeare-char" if device.type == "cuda" else "baby")
    if resumed is not None:
        # the run continues with its own configuration; flags given now may only extend max_iters
        if resumed["vocab"] != tokenizer.chars:
            raise FastGPTError(f"the data's vocabulary ({tokenizer.vocab_size} characters) differs "
                               f"from the checkpoint's ({len(resumed['vocab'])}); resume with the "
                               f"same --data")
        mcfg = cfgmod.GPTConfig(**resumed["model_args"])
        tcfg = cfgmod.TrainConfig(**{**resumed["train_args"],
                                     **{k: v for k, v in opts.overrides.items()
                                        if k in cfgmod.TRAIN_FIELDS and v is not None}})
        model_kind = resumed["model_kind"]
    else:
        mcfg, tcfg = cfgmod.preset(preset_name, **opts.overrides)
        mcfg.vocab_size = tokenizer.vocab_size
        model_kind = opts.model
    check_backends(model_kind, mcfg)
    dataset = TextDataset(text, tokenizer, mcfg.block_size,
                          source=f"data file {opts.data!r}" if opts.data else "the bundled text")

    torch.manual_seed(opts.seed)
    model = build_model(model_kind, mcfg).to(device)   # the same initial weights on every rank
    batches = BatchStream(dataset, tcfg.batch_size, device, world)   # the same on every rank
    if world.enabled:
        torch.manual_seed(distributed.rank_seed(opts.seed, world.rank))   # each rank's own dropout
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    # `model` holds the fp32 master weights; on CPU in bf16 a bf16 copy does the compute, and
    # FlatAdamW clips, steps and refreshes it in one C++ op (None: torch.optim.AdamW does)
    low = LowPrecisionCopy(model, dtype) if uses_working_copy(device.type, dtype) else None
    betas = (tcfg.beta1, tcfg.beta2)
    flat = (flat_adamw_or_none(optimizer_groups(model, tcfg.weight_decay), low.pairs,
                               tcfg.learning_rate, betas, tcfg.grad_clip)
            if low is not None else None)
    optimizer = flat or make_optimizer(model, tcfg.learning_rate, tcfg.weight_decay, betas)
    scaler = grad_scaler(device.type, dtype)
    start_iter, best_val = 0, float("inf")
    losses = {"train": float("nan"), "val": float("nan")}
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed.get("scaler", {}))
        _resume_rng(resumed, world, device, batches)
        start_iter, best_val = resumed["iter_num"], resumed["best_val_loss"]
        losses = {"train": resumed["train_loss"], "val": resumed["val_loss"]}
    compute_model = model if low is None else low.model
    # DDP averages the gradients over the ranks; eval uses the plain model
    ddp = (torch.nn.parallel.DistributedDataParallel(
        compute_model, device_ids=[device.index] if device.type == "cuda" else None)
        if world.enabled else None)
    step_model = compute_model if ddp is None else ddp
    step_model = torch.compile(step_model) if opts.compile else step_model
    metrics = (MetricsLog(out_dir / METRICS_NAME, fresh=resumed is None) if world.is_main
               else _Discard())
    ctx = autocast(device.type, dtype)
    tokens_per_iter = tcfg.batch_size * mcfg.block_size * tcfg.gradient_accumulation_steps

    @torch.inference_mode()
    def estimate_loss() -> dict[str, float]:
        compute_model.eval()
        out = {}
        for split in ("train", "val"):
            drawn = [batches.draw(split) for _ in range(tcfg.eval_iters)]
            total = torch.zeros((), device=device)
            # several equal-size batches per forward: the mean of group means is the same
            # estimate, and bigger matmuls run faster
            for i in range(0, len(drawn), EVAL_GROUP):
                group = drawn[i:i + EVAL_GROUP]
                x = torch.cat([b[0] for b in group])
                y = torch.cat([b[1] for b in group])
                with ctx:
                    _, loss = compute_model(x, y)
                total += loss.float() * len(group)
            out[split] = distributed.mean(total / tcfg.eval_iters, world).item()   # same on all ranks
        compute_model.train()
        return out

    def checkpoint(it: int, losses: dict) -> None:
        # every rank's RNG state goes in, so a resume with as many ranks goes on bit for bit
        ranks = ({"world_size": world.size,
                  "rng_ranks": distributed.all_gather(_rng_state(device, batches), world)}
                 if world.enabled else {})
        if not world.is_main:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "iter_num": it, "best_val_loss": best_val,
            "train_loss": losses["train"], "val_loss": losses["val"], "model_kind": model_kind, "model_args": asdict(mcfg),
            "train_args": asdict(tcfg), "vocab": tokenizer.chars, "dtype": resolve_dtype_name(opts.dtype, device.type),
            "seed": opts.seed, "rng": _rng_state(device, batches), **ranks,
        })

    from tqdm import tqdm
    bar = tqdm(total=tcfg.max_iters, initial=start_iter,
               disable=not (opts.progress and world.is_main), dynamic_ncols=True, unit="it")
    pending: list[tuple[int, torch.Tensor]] = []   # recent losses, read at log time (no per-step sync)
    last_ckpt_iter = start_iter if resumed is not None else None
    t_log, tokens_since_log, tok_per_s = time.perf_counter(), 0, 0.0
    compute_model.train()
    if batches.pending is None:
        batches.prefetch()
    try:
        for it in range(start_iter, tcfg.max_iters + 1):
            lr = lr_at(it, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            is_eval = it % tcfg.eval_interval == 0 or it == tcfg.max_iters
            if is_eval and not (resumed is not None and it == start_iter):
                losses = estimate_loss()
                if not all(math.isfinite(v) for v in losses.values()):
                    raise FastGPTError(_diverged_message(it, losses["val"], last_ckpt_iter, ckpt_path))
                best_val = min(best_val, losses["val"])
                metrics.write(kind="eval", iter=it, train_loss=losses["train"],
                              val_loss=losses["val"], lr=lr, tokens_per_s=tok_per_s,
                              wall_time=time.perf_counter() - t_start)
                if world.is_main:
                    bar.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                checkpoint(it, losses)
                last_ckpt_iter = it
            if it == tcfg.max_iters:
                break

            for micro in range(tcfg.gradient_accumulation_steps):
                x, y = batches.take()
                # DDP all-reduces the gradients only in the backward of the last micro-step
                last = micro + 1 == tcfg.gradient_accumulation_steps
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    with ctx:
                        _, loss = step_model(x, y)
                    batches.prefetch()   # the next batch, fetched while this one is in flight
                    scaler.scale(loss / tcfg.gradient_accumulation_steps).backward()
            if flat is not None:
                flat.step()   # no scaler: bf16 needs no loss scaling
            else:
                if low is not None:
                    low.grads_to_master()
                if tcfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    if low is not None:
                        low.clip_grad_norm_(tcfg.grad_clip)
                    else:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if low is not None:
                    low.refresh()
            optimizer.zero_grad(set_to_none=True)
            pending.append((it, loss.detach()))
            tokens_since_log += tokens_per_iter
            bar.update(1)

            if len(pending) >= tcfg.log_interval or it + 1 == tcfg.max_iters:
                # the mean over ranks: one sync, and every rank sees a NaN anywhere, so all stop
                values = distributed.mean(torch.stack([l for _, l in pending]).float(), world).cpu()
                bad = (~torch.isfinite(values)).nonzero()
                if len(bad):
                    first = int(bad[0])
                    raise FastGPTError(_diverged_message(pending[first][0], values[first].item(),
                                                         last_ckpt_iter, ckpt_path))
                now = time.perf_counter()
                tok_per_s = tokens_since_log / (now - t_log)
                t_log, tokens_since_log = now, 0
                metrics.write(kind="train", iter=it, train_loss=values[-1].item(), val_loss=None,
                              lr=lr, tokens_per_s=tok_per_s, wall_time=now - t_start)
                bar.set_postfix(loss=f"{values[-1].item():.4f}", tok_s=f"{tok_per_s:,.0f}")
                pending.clear()
    finally:
        bar.close()
        if world.is_main and (out_dir / METRICS_NAME).exists() and (out_dir / METRICS_NAME).stat().st_size:
            plot_losses(out_dir / METRICS_NAME, out_dir / PLOT_NAME)

    sample = ""
    if opts.sample_chars > 0 and world.is_main:
        start = torch.tensor([[tokenizer.stoi.get("\n", 0)]], device=device)
        gen = torch.Generator(device=device).manual_seed(opts.seed)
        model.eval()
        with ctx:
            ids = generate(model, start, opts.sample_chars, generator=gen)
        sample = tokenizer.decode(ids[0].tolist())
    return RunResult(iter_num=tcfg.max_iters, train_loss=losses["train"], val_loss=losses["val"],
                     best_val_loss=best_val, wall_time=time.perf_counter() - t_start,
                     out_dir=str(out_dir), sample=sample, rank=world.rank)


def _diverged_message(it, value, last_ckpt_iter, ckpt_path) -> str:
    kept = (f"the last good checkpoint ({str(ckpt_path)!r}, iteration {last_ckpt_iter}) is kept"
            if last_ckpt_iter is not None else "no checkpoint had been written yet")
    return (f"loss became {value} at iteration {it}; training stopped and {kept}. Try a lower "
            f"--learning-rate, --grad-clip 1.0, or --dtype float32")
