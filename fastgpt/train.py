"""The training loop: nanoGPT's recipe (AdamW, warmup + cosine schedule, gradient clipping,
periodic train/val estimates) with safe checkpoints, exact resume and mixed precision.

Iteration ``it`` runs 0..max_iters: the loss is estimated at every eval_interval (and at the
last iteration), a checkpoint is written after each estimate, then one optimizer step is taken;
the run ends after the estimate at ``max_iters``. A checkpoint therefore holds the state at the
start of iteration ``iter_num``, and ``resume`` continues from there bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
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
from tqdm import tqdm

from fastgpt import config as cfgmod
from fastgpt import distributed, host_memory, ops, profiling, recompute, sharding
from fastgpt.checkpoint import (CHECKPOINT_NAME, SHARDED_NAME, checkpoint_in, load_checkpoint,
                                save_checkpoint, write_atomically)
from fastgpt.device import describe, resolve_device
from fastgpt.run_data import DataSource, open_source, spec_of_checkpoint
from fastgpt.errors import FastGPTError
from fastgpt.flops import Throughput, throughput
from fastgpt.generate import generate
from fastgpt.model import build_model
from fastgpt.pretrained import Pretrained, load_pretrained, specs_match
from fastgpt.sharded_checkpoint import (load_full_optimizer, load_sharded, remove_stale,
                                        save_sharded)
from fastgpt.ops.labels import labelled
from fastgpt.precision import Stepper, autocast, parse_dtype, resolve_dtype
from fastgpt.tensorboard_log import ScalarLog, writer_class

# what --exact pins besides float32: nanoGPT's unfused block and its attention (torch's sdpa),
# whatever the defaults for float32 are (fastgpt.ops may make a fused block the CPU default);
# it also keeps torch.optim.AdamW with clip_grad_norm_ (precision.Stepper)
EXACT_BACKENDS = {"transformer_block": "torch", "attention": "sdpa"}
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
EVAL_GROUP = 4   # eval batches per forward pass


@dataclass
class RunOptions:
    """Everything `fastgpt train` takes besides the preset's model/training fields."""
    model: str = "gpt"
    preset: Optional[str] = None           # None: baby on CPU, shakespeare-char on CUDA
    data: Optional[str] = None             # None: the bundled tiny Shakespeare
    init_from: Optional[str] = None        # start from GPT-2 weights: a Hugging Face folder or
                                           # a name (gpt2, ...; see fastgpt.pretrained)
    device: str = "auto"
    dtype: str = "auto"                    # see fastgpt.precision
    exact: bool = False                    # nanoGPT's fp32 math step for step: float32,
                                           # EXACT_BACKENDS and torch's AdamW (auto resolves
                                           # to float32)
    compile: bool = False
    fsdp: bool = False                     # shard over torchrun's ranks (fastgpt.sharding)
    fsdp_reshard_after_forward: bool = True
    activation_checkpointing: str = "none"   # fastgpt.recompute.MODES
    out_dir: str = "out"
    resume: bool = False
    overwrite: bool = False
    seed: int = 1337
    sample_chars: int = 300
    progress: bool = True
    header: bool = True                    # print what the run is (rank 0)
    profile: bool = False                  # torch.profiler over a few steps (fastgpt.profiling)
    profile_wait: int = 10                 # steps before the profiled ones
    profile_steps: int = 5                 # steps profiled
    tensorboard: Optional[str] = None      # a folder for TensorBoard scalars (tensorboard_log)
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


def check_exact(opts: RunOptions) -> RunOptions:
    """``opts`` with --exact's backends pinned; FastGPTError when --exact comes with a --dtype
    other than float32 (or auto) or a backend flag other than EXACT_BACKENDS'."""
    if not opts.exact:
        return opts
    if opts.dtype not in ("auto", "float32"):
        raise FastGPTError(f"--exact trains in float32 (nanoGPT's fp32 math); --dtype "
                           f"{opts.dtype} conflicts with it: drop --dtype (or use float32)")
    for name, backend in EXACT_BACKENDS.items():
        asked = opts.overrides.get(name)
        if asked not in (None, backend):
            flag = "--" + name.replace("_", "-")
            raise FastGPTError(f"--exact pins {flag} {backend} (nanoGPT's fp32 math); {flag} "
                               f"{asked} conflicts with it: drop {flag} (or use {backend})")
    return dataclasses.replace(opts, overrides={**opts.overrides, **EXACT_BACKENDS})


def run_precision(opts: RunOptions, device_type: str,
                  resumed: Optional[dict]) -> tuple[bool, str, str]:
    """(exact, dtype name, why) of a run: --exact, or resuming an --exact run, trains in
    float32 (a resumed one with another --dtype is an error); else --dtype resolved."""
    if not (opts.exact or (resumed is not None and resumed.get("exact"))):
        return (False, *resolve_dtype(opts.dtype, device_type))
    if opts.exact:
        return True, "float32", "--exact: nanoGPT's fp32 math step for step"
    if opts.dtype not in ("auto", "float32"):
        raise FastGPTError(f"the run in {opts.out_dir!r} trains with --exact (float32, "
                           f"nanoGPT's fp32 math); --dtype {opts.dtype} conflicts with it: "
                           f"resume without --dtype (or with float32)")
    return True, "float32", "--exact, as the run it resumes: nanoGPT's fp32 math step for step"


def check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """The run directory's checkpoint (ckpt.pt, or ckpt.dcp of an --fsdp run) is there with
    --resume and not there without it (unless --overwrite). Checks only: nothing is created
    before every input has been validated."""
    ckpt = checkpoint_in(out_dir)
    if resume and ckpt is None:
        raise FastGPTError(f"--resume given but {str(out_dir / CHECKPOINT_NAME)!r} does not "
                           f"exist; train without --resume first")
    if not resume and ckpt is not None and not overwrite:
        raise FastGPTError(f"{str(ckpt)!r} already exists; pass --resume to continue that run, "
                           f"--overwrite to start over, or a different --out-dir")


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FastGPTError(f"out dir {str(out_dir)!r} is not writable: {e.strerror}") from None


class MetricsLog:
    """Appends one JSON object per line, flushed at once so a killed run keeps its rows.

    A fresh run starts an empty log. A run resumed from the checkpoint of iteration
    ``resume_iter`` keeps the log's history up to that checkpoint: rows a killed run wrote past
    it are dropped (atomically), as their iterations run again, so the file stays one history
    in order.
    """

    def __init__(self, path: Path, resume_iter: Optional[int] = None):
        self.path = path
        if resume_iter is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if _before_checkpoint(line, resume_iter)]
            write_atomically(path, lambda f: f.write("".join(f"{l}\n" for l in kept).encode()))

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _before_checkpoint(line: str, it: int) -> bool:
    """Whether a metrics row belongs to the history up to the checkpoint of iteration ``it``,
    which holds the state after the estimate at ``it`` and before that iteration's step."""
    try:
        row = json.loads(line)
    except ValueError:      # a line the kill cut short
        return False
    if row.get("kind") == "train":
        return row["iter"] < it
    if row.get("kind") == "eval":
        return row["iter"] <= it
    return True


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

    def __init__(self, dataset, batch_size: int, device: torch.device,
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

    def eval_batches(self, split: str, n: int) -> list:
        """The batches of an estimate: from the stream, as nanoGPT draws them, or, where the
        dataset says so (token shards), the same fixed windows at every estimate."""
        if not getattr(self.dataset, "fixed_eval_windows", False):
            return [self.draw(split) for _ in range(n)]
        gen = torch.Generator().manual_seed(self.dataset.EVAL_SEED[split])
        return [self.dataset.batch(split, self.batch_size, gen, self.device, self.rows)
                for _ in range(n)]

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
    run = _setup(opts, world, device)
    if device.type == "cpu":   # large activations come back each step without page faults
        host_memory.keep_freed_memory(_largest_activation(run.mcfg, run.tcfg))
    # what MFU divides by: on a CPU a matmul probe, so measured before the run loads the machine
    rates = throughput(run.model, device, run.dtype, world.size) if world.is_main else None
    # its probe forward is collective when sharded: every rank runs it, rank 0 keeps it
    info = describe_run(run, rates) if world.is_main or run.sharded else {}
    info = info if world.is_main else {}
    if info and opts.header:
        print(format_header(info), flush=True)
    progress = _Progress(run, t_start, info, rates)
    profiler = (profiling.StepProfiler(run.out_dir, device, opts.profile_wait, opts.profile_steps,
                                       world.rank, world.size,
                                       format_header(info) if info else "")
                if opts.profile else None)
    try:
        with profiler or contextlib.nullcontext():
            _loop(run, progress, profiler)
    finally:
        progress.close()
    if profiler is not None and world.is_main:
        print(f"profile of iterations {run.start_iter + opts.profile_wait}.."
              f"{run.start_iter + opts.profile_wait + opts.profile_steps - 1}: "
              + ", ".join(str(p) for p in profiler.written), flush=True)
    # sharded, every rank takes part in gathering the weights rank 0 samples with
    sample = (run.sample() if opts.sample_chars > 0 and (world.is_main or run.sharded)
              else "")
    return RunResult(iter_num=run.tcfg.max_iters, train_loss=run.losses["train"],
                     val_loss=run.losses["val"], best_val_loss=run.best_val,
                     wall_time=time.perf_counter() - t_start, out_dir=str(run.out_dir),
                     sample=sample, rank=world.rank)


def _largest_activation(m: cfgmod.GPTConfig, t: cfgmod.TrainConfig) -> int:
    """Bytes of a step's largest activation, about: the MLP's hidden rows or the attention
    probabilities (fp32) of one micro-batch."""
    rows = t.batch_size * m.block_size
    return rows * max(4 * m.n_embd, m.n_head * m.block_size) * 4


def _loop(run: _Run, progress: _Progress,
          profiler: Optional[profiling.StepProfiler] = None) -> None:
    """Iterations start_iter..max_iters: an estimate and a checkpoint where one is due, then a
    step (none after the last estimate). The labels name the loop's parts in a profile."""
    t = run.tcfg
    for it in range(run.start_iter, t.max_iters + 1):
        lr = lr_at(it, t)
        run.stepper.set_lr(lr)
        if run.estimate_due(it):
            with labelled("fastgpt.estimate"):
                losses = run.evaluate(it)
            progress.eval_row(it, losses, lr)
            with labelled("fastgpt.checkpoint"):
                run.checkpoint(it)
        if it == t.max_iters:
            break
        progress.stepped(it, run.train_step())
        if len(progress.pending) >= t.log_interval or it + 1 == t.max_iters:
            progress.train_row(it, run.last_step_loss(progress.pending), lr,
                               run.stepper.grad_norm)
        if profiler is not None:
            profiler.step()


def _setup(opts: RunOptions, world: distributed.World, device: torch.device) -> _Run:
    """Data, configuration, model and optimizer; on --resume, the checkpoint's state."""
    opts = check_exact(opts)
    parse_dtype(opts.dtype, device.type)   # a bad or refused --dtype stops before anything else
    out_dir = Path(opts.out_dir)
    check_out_dir(out_dir, opts.resume, opts.overwrite)
    recompute.check_mode(opts.activation_checkpointing)
    sharded = _sharded(opts, world)
    # a sharded run reads its own shards once the model is sharded (resume_from)
    resumed = load_checkpoint(out_dir, consolidate=not sharded) if opts.resume else None
    exact, dtype_name, dtype_reason = run_precision(opts, device.type, resumed)
    dtype = parse_dtype(dtype_name, device.type)
    source = open_source(opts.data)
    # --init-from gives the initial weights; a resumed run has its own
    pretrained = _pretrained(opts, source) if opts.init_from and resumed is None else None
    model_kind, mcfg, tcfg = _configure(opts, device, source, resumed, pretrained)
    if exact:   # a resumed run keeps its checkpoint's backends, but not past --exact
        mcfg = dataclasses.replace(mcfg, **EXACT_BACKENDS)
    check_backends(model_kind, mcfg)
    if opts.profile:
        profiling.check_window(opts.profile_wait, opts.profile_steps,
                               resumed["iter_num"] if resumed else 0, tcfg.max_iters)
    if opts.tensorboard is not None:
        writer_class()   # installed, or say so before anything runs
    dataset = source.dataset(mcfg.block_size)

    torch.manual_seed(opts.seed)
    # the same initial weights on every rank: the seed's, or the pretrained ones
    model = build_model(model_kind, mcfg) if pretrained is None else pretrained.model
    model = model if sharded else model.to(device)   # sharding moves only the shards there
    batches = BatchStream(dataset, tcfg.batch_size, device, world)   # the same on every rank
    make_out_dir(out_dir)   # every input is valid: only now is anything created on disk
    if world.enabled:
        torch.manual_seed(distributed.rank_seed(opts.seed, world.rank))   # each rank's own dropout
    if resumed is not None and "model" in resumed:
        model.load_state_dict(resumed["model"])
    if sharded:
        sharding.shard(model, device, world.size, dtype, opts.fsdp_reshard_after_forward)
    # `model` holds the fp32 master weights (sharded: each rank its shards); on CPU in bf16
    # unsharded, the stepper's bf16 copy computes
    run = _Run(opts=opts, world=world, device=device, out_dir=out_dir, source=source,
               model_kind=model_kind, mcfg=mcfg, tcfg=tcfg, model=model,
               stepper=Stepper(model, device.type, dtype, tcfg, sharded=sharded, exact=exact),
               batches=batches, ctx=autocast(device.type, dtype), dtype=dtype,
               dtype_reason=dtype_reason, exact=exact,
               init_from=resumed.get("init_from") if resumed is not None else opts.init_from,
               sharded=sharded)
    if resumed is not None:
        run.resume_from(resumed)
    run.wrap_for_steps()
    run.stepper.model.train()
    if batches.pending is None:
        batches.prefetch()
    return run


def _sharded(opts: RunOptions, world: distributed.World) -> bool:
    """Whether the run shards (--fsdp under torchrun); --fsdp in one process is noted and
    trains unsharded."""
    if opts.fsdp and not world.enabled and opts.header:
        logging.getLogger("fastgpt").warning(
            "fastgpt: --fsdp with one process: there is nothing to shard over, training "
            "unsharded (launch with torchrun --nproc_per_node=N to shard over N processes)")
    return opts.fsdp and world.enabled


def _pretrained(opts: RunOptions, source: DataSource) -> Pretrained:
    """The model --init-from names, with --dropout, --block-size and the backend flags applied;
    its tokenizer must be the data's. Its vocabulary stays the source's (see fastgpt.pretrained
    on padding)."""
    if opts.model != "gpt":
        raise FastGPTError(f"--init-from loads a GPT; --model {opts.model} cannot start from it")
    pre = load_pretrained(opts.init_from, **{k: v for k, v in opts.overrides.items()
                                             if k in cfgmod.MODEL_FIELDS})
    if pre.spec is None:
        raise FastGPTError(
            f"--init-from {opts.init_from!r}: its vocabulary of {pre.source_vocab_size} tokens "
            f"comes with no tokenizer (no fastgpt_tokenizer.json, vocab.json + merges.txt or "
            f"tokenizer.json in {str(pre.folder)!r}), so nothing says the data's token ids mean "
            f"the same; add the tokenizer's files to that folder")
    if not specs_match(pre.spec, source.spec):
        raise FastGPTError(
            f"the data's tokenizer ({_describe_spec(source.spec, source.vocab_size)}) differs "
            f"from the model's ({_describe_spec(pre.spec, pre.source_vocab_size)}, --init-from "
            f"{opts.init_from!r}); prepare the data with the model's tokenizer (fastgpt prepare "
            f"--tokenizer gpt2 for GPT-2's)")
    return pre


def _describe_spec(spec: dict, vocab_size: int) -> str:
    kind = spec.get("kind")
    name = ("GPT-2's BPE" if kind == "gpt2" and "ranks" not in spec else
            "a GPT-2-format BPE" if kind == "gpt2" else
            "characters" if kind == "char" else f"a byte-level BPE ({kind})")
    return f"{name}, vocabulary {vocab_size}"


def _configure(opts: RunOptions, device: torch.device, source: DataSource,
               resumed: Optional[dict], pretrained: Optional[Pretrained] = None,
               ) -> tuple[str, cfgmod.GPTConfig, cfgmod.TrainConfig]:
    """The model kind and configuration: the preset's with the overrides (the pretrained
    model's shape with --init-from), or the checkpoint's."""
    if resumed is None:
        preset_name = opts.preset or cfgmod.default_preset(device.type)
        mcfg, tcfg = cfgmod.preset(preset_name, **opts.overrides)
        if pretrained is not None:
            return "gpt", pretrained.model.config, tcfg
        mcfg.vocab_size = source.model_vocab_size
        return opts.model, mcfg, tcfg
    # the run continues with its own configuration; flags given now may only extend max_iters
    saved = spec_of_checkpoint(resumed)
    if saved != source.spec:
        what = "characters" if source.spec.get("kind") == "char" else "tokens"
        raise FastGPTError(f"the data's tokenizer ({source.spec.get('kind')}, vocabulary "
                           f"{source.vocab_size} {what}) differs from the checkpoint's "
                           f"({saved.get('kind')}); resume with the same --data")
    mcfg = cfgmod.GPTConfig(**resumed["model_args"])
    tcfg = cfgmod.TrainConfig(**{**resumed["train_args"],
                                 **{k: v for k, v in opts.overrides.items()
                                    if k in cfgmod.TRAIN_FIELDS and v is not None}})
    return resumed["model_kind"], mcfg, tcfg


@dataclass
class _Run:
    """One run as _setup builds it (every rank holds one), and the state its iterations carry
    on: the last estimate, the best val loss and the last checkpoint's iteration."""
    opts: RunOptions
    world: distributed.World
    device: torch.device
    out_dir: Path
    source: DataSource            # the data's tokenizer: its spec, and itself for samples
    model_kind: str
    mcfg: cfgmod.GPTConfig
    tcfg: cfgmod.TrainConfig
    model: torch.nn.Module        # the fp32 master weights: what checkpoints hold and samples use
    stepper: Stepper              # its .model runs forward and backward (and the estimates)
    batches: BatchStream
    ctx: contextlib.AbstractContextManager   # autocast, or nothing
    dtype: torch.dtype                       # what the step computes in
    dtype_reason: str = "asked for"          # why (fastgpt.precision.resolve_dtype)
    exact: bool = False                      # --exact: nanoGPT's fp32 math (EXACT_BACKENDS)
    init_from: Optional[str] = None          # where the initial weights came from (--init-from)
    sharded: bool = False                    # FSDP (fastgpt.sharding): every rank holds shards
    resumed: bool = False
    start_iter: int = 0
    best_val: float = float("inf")
    losses: dict = field(default_factory=lambda: {"train": float("nan"), "val": float("nan")})
    last_ckpt_iter: Optional[int] = None
    ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None
    step_model: Optional[torch.nn.Module] = None   # what a training step calls

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / (SHARDED_NAME if self.sharded else CHECKPOINT_NAME)

    def resume_from(self, resumed: dict) -> None:
        if not self.sharded:
            self.stepper.load_state_dict(resumed)
        else:   # each rank loads its shards: from a sharded checkpoint, or from a full one
            if "model" not in resumed:
                load_sharded(resumed["sharded"], self.model, self.stepper.optimizer)
            else:
                load_full_optimizer(resumed["optimizer"], self.model, self.stepper.optimizer)
            self.stepper.scaler.load_state_dict(resumed.get("scaler", {}))
        _resume_rng(resumed, self.world, self.device, self.batches)
        self.resumed, self.start_iter = True, resumed["iter_num"]
        self.best_val, self.last_ckpt_iter = resumed["best_val_loss"], resumed["iter_num"]
        self.losses = {"train": resumed["train_loss"], "val": resumed["val_loss"]}

    def wrap_for_steps(self) -> None:
        """DDP (which averages the gradients over the ranks) and torch.compile, as asked; the
        estimates use the plain model."""
        model = self.stepper.model
        recompute.apply(model, self.opts.activation_checkpointing)
        if self.world.enabled and not self.sharded:   # FSDP's units average the gradients
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        model = model if self.ddp is None else self.ddp
        self.step_model = torch.compile(model) if self.opts.compile else model

    def estimate_due(self, it: int) -> bool:
        """At every eval_interval and at max_iters, except at a resumed run's first iteration:
        the checkpoint it starts from holds that estimate."""
        t = self.tcfg
        return ((it % t.eval_interval == 0 or it == t.max_iters)
                and not (self.resumed and it == self.start_iter))

    def train_step(self) -> torch.Tensor:
        """One update from gradient_accumulation_steps micro-batches; the last one's loss."""
        steps = self.tcfg.gradient_accumulation_steps
        for micro in range(steps):
            x, y = self.batches.take()
            # DDP all-reduces the gradients only in the backward of the last micro-step
            last = micro + 1 == steps
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with self.ctx:
                    _, loss = self.step_model(x, y)
                with labelled("fastgpt.data"):
                    self.batches.prefetch()   # the next batch, fetched while this one runs
                self.stepper.backward(loss / steps)
        with labelled("fastgpt.optimizer"):
            self.stepper.step()
        return loss.detach()

    def last_step_loss(self, pending: list[tuple[int, torch.Tensor]]) -> float:
        """The last of the (iteration, loss) pairs' losses, averaged over the ranks; raises at the
        first that is not finite. One sync, and every rank sees a NaN anywhere, so all stop."""
        values = distributed.mean(torch.stack([l for _, l in pending]).float(), self.world).cpu()
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            first = int(bad[0])
            raise FastGPTError(_diverged_message(pending[first][0], values[first].item(),
                                                 self.last_ckpt_iter, self.ckpt_path))
        return values[-1].item()

    def evaluate(self, it: int) -> dict[str, float]:
        """Estimate the losses and keep them; raises when one is not finite."""
        losses = self.estimate_loss()
        if not all(math.isfinite(v) for v in losses.values()):
            raise FastGPTError(_diverged_message(it, losses["val"], self.last_ckpt_iter,
                                                 self.ckpt_path))
        self.losses, self.best_val = losses, min(self.best_val, losses["val"])
        return losses

    def estimate_loss(self) -> dict[str, float]:
        """The mean loss over eval_iters batches of each split; the same on every rank.
        Sharded, under no_grad: FSDP's gathered weights must not become inference tensors."""
        with torch.no_grad() if self.sharded else torch.inference_mode():
            return self._estimate_loss()

    def _estimate_loss(self) -> dict[str, float]:
        model, t = self.stepper.model, self.tcfg
        model.eval()
        out = {}
        for split in ("train", "val"):
            drawn = self.batches.eval_batches(split, t.eval_iters)
            total = torch.zeros((), device=self.device)
            # several equal-size batches per forward: the mean of group means is the same
            # estimate, and bigger matmuls run faster
            for i in range(0, len(drawn), EVAL_GROUP):
                group = drawn[i:i + EVAL_GROUP]
                x = torch.cat([b[0] for b in group])
                y = torch.cat([b[1] for b in group])
                with self.ctx:
                    _, loss = model(x, y)
                total += loss.float() * len(group)
            out[split] = distributed.mean(total / t.eval_iters, self.world).item()
        model.train()
        return out

    def checkpoint(self, it: int) -> None:
        """Save the state at the start of iteration ``it``: rank 0 writes ckpt.pt, or, sharded,
        every rank writes its shards of ckpt.dcp (fastgpt.sharded_checkpoint)."""
        world = self.world
        # every rank's RNG state goes in, so a resume with as many ranks goes on bit for bit
        ranks = ({"world_size": world.size,
                  "rng_ranks": distributed.all_gather(_rng_state(self.device, self.batches), world)}
                 if world.enabled else {})
        meta = self._checkpoint_meta(it, ranks)
        if self.sharded:
            save_sharded(self.out_dir, self.model, self.stepper.optimizer,
                         {**meta, "scaler": self.stepper.scaler.state_dict()}, world)
        elif world.is_main:
            save_checkpoint(self.ckpt_path, {"model": self.model.state_dict(),
                                             **self.stepper.state_dict(), **meta})
            remove_stale(self.out_dir)   # a sharded checkpoint this run started from
        self.last_ckpt_iter = it

    def _checkpoint_meta(self, it: int, ranks: dict) -> dict:
        """A checkpoint's state besides the model, optimizer and scaler."""
        return {"iter_num": it, "best_val_loss": self.best_val, "train_loss": self.losses["train"],
                "val_loss": self.losses["val"], "model_kind": self.model_kind,
                "model_args": asdict(self.mcfg), "train_args": asdict(self.tcfg),
                "tokenizer": self.source.spec, "init_from": self.init_from,
                **({"vocab": self.source.spec["chars"]} if self.source.spec["kind"] == "char" else {}),
                "dtype": str(self.dtype).removeprefix("torch."), "exact": self.exact,
                "seed": self.opts.seed, "rng": _rng_state(self.device, self.batches), **ranks}

    def sample(self) -> str:
        """opts.sample_chars tokens from the trained model, seeded by opts.seed, after a newline
        (characters) or the end-of-text token (BPE); "" without a tokenizer (see run_data)."""
        tokenizer = self.source.tokenizer
        if tokenizer is None:
            return ""
        model = self.model
        if self.sharded:   # the full weights, gathered to rank 0, which samples alone
            model = sharding.gathered(model, self.model_kind, self.mcfg, self.world.rank,
                                      self.device)
            if model is None:
                return ""
        first = tokenizer.eot_id if tokenizer.eot_id is not None else tokenizer.stoi.get("\n", 0)
        start = torch.tensor([[first]], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.opts.seed)
        model.eval()
        with self.ctx:
            ids = generate(model, start, self.opts.sample_chars, generator=gen,
                           vocab_size=tokenizer.vocab_size)
        return tokenizer.decode(ids[0, 1:].tolist() if tokenizer.eot_id is not None
                                else ids[0].tolist())


def describe_run(run: "_Run", rates: Optional[Throughput] = None) -> dict:
    """What the run is: the `kind: "run"` row of metrics.jsonl and the header `fastgpt train`
    prints. The backends are those fastgpt.ops picks in one probe forward on a batch of the
    training step's shape (its dropout randomness restored, its graph dropped), so they are the
    step's own: measured dispatch keys its choices by shape, and this is where it measures."""
    opts, m, t, device = run.opts, run.mcfg, run.tcfg, run.device
    rows = run.batches.rows.stop - run.batches.rows.start
    x = torch.zeros((rows, m.block_size), dtype=torch.long, device=device)
    with ops.registry.recording_choices() as backends, \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), run.ctx:
        run.stepper.model(x, x)
    ckpt = checkpoint_in(run.out_dir)   # the one resumed from
    return dict(
        kind="run", iter=run.start_iter, model=run.model_kind,
        preset=(opts.preset or cfgmod.default_preset(device.type)) if not run.resumed
        else "the checkpoint's configuration",
        params=sum(p.numel() for p in run.model.parameters()),
        data=opts.data or "the bundled text", vocab_size=m.vocab_size, init_from=run.init_from,
        device=str(device), device_name=describe(device), threads=torch.get_num_threads(),
        host_memory=host_memory.kept(),
        dtype=str(run.dtype).removeprefix("torch."), dtype_reason=run.dtype_reason,
        exact=run.exact, backends=backends,
        compile=opts.compile, world_size=run.world.size, fsdp=run.sharded,
        activation_checkpointing=opts.activation_checkpointing,
        optimizer=sharding.OPTIMIZER_NOTE if run.sharded else run.stepper.optimizer_name,
        batch_size=t.batch_size,
        block_size=m.block_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
        tokens_per_iter=cfgmod.tokens_per_iter(m, t),
        max_iters=t.max_iters, seed=opts.seed,
        flops_per_token=rates.flops_per_token if rates else None,
        peak_tflops=rates.peak_tflops if rates else None,
        peak_source=rates.peak_source if rates else None,
        resumed_from=run.start_iter if run.resumed else None,
        checkpoint_time=(datetime.datetime.fromtimestamp(ckpt.stat().st_mtime)
                         .isoformat(timespec="seconds") if run.resumed else None))


def format_header(info: dict) -> str:
    lines = [f"fastgpt train: {info['model']} model, {info['params'] / 1e6:.2f} M parameters, "
             f"preset {info['preset']}, data {info['data']} (vocabulary {info['vocab_size']})"
             + (f", weights from {info['init_from']}" if info.get("init_from") else ""),
             f"  device {info['device']}: {info['device_name']}, {info['threads']} threads"
             + (f", {info['world_size']} processes" if info["world_size"] > 1 else "")
             + (f"; host memory: {host_memory.KEPT}" if info.get("host_memory") else ""),
             f"  dtype {info['dtype']} ({info['dtype_reason']})"
             + (", torch.compile" if info["compile"] else ""),
             ("  FSDP: weights, gradients and optimizer state sharded over "
              f"{info['world_size']} processes; " if info.get("fsdp") else "  ")
             + f"optimizer {info['optimizer']}"
             + (f"; activation checkpointing {info['activation_checkpointing']}"
                if info.get("activation_checkpointing", "none") != "none" else ""),
             "  backends: " + ", ".join(f"{op}={name}" for op, name in info["backends"].items()),
             f"  {info['batch_size']} x {info['block_size']} tokens x "
             f"{info['gradient_accumulation_steps']} accumulation = {info['tokens_per_iter']:,} "
             f"tokens per step, {info['max_iters']:,} steps"]
    if info.get("flops_per_token"):
        lines.append(f"  {info['flops_per_token']:,.0f} FLOPs per token (fastgpt.flops); "
                     f"MFU against {info['peak_source']}")
    if info["resumed_from"] is not None:
        lines.append(f"  resuming from iteration {info['resumed_from']} (checkpoint of "
                     f"{info['checkpoint_time']})")
    return "\n".join(lines)


class _Progress:
    """What a run shows and records as it goes: metrics.jsonl rows (rank 0 only), the progress
    bar and the tokens/s. Step losses wait in ``pending`` as tensors until a train row reads
    them, so a step costs no host sync."""

    def __init__(self, run: _Run, t_start: float, info: dict,
                 rates: Optional[Throughput] = None):
        self.out_dir, self.is_main, self.t_start = run.out_dir, run.world.is_main, t_start
        self.rates = rates
        resume_iter = run.start_iter if run.resumed else None
        self.metrics = (MetricsLog(run.out_dir / METRICS_NAME, resume_iter)
                        if self.is_main else _Discard())
        self.scalars = (ScalarLog(run.opts.tensorboard, resume_iter)
                        if self.is_main and run.opts.tensorboard is not None else None)
        self.metrics.write(**info)   # rank 0's run row: each start or resume says what it is
        self.bar = tqdm(total=run.tcfg.max_iters, initial=run.start_iter,
                        disable=not (run.opts.progress and self.is_main), dynamic_ncols=True,
                        unit="it")
        self.tokens_per_iter = cfgmod.tokens_per_iter(run.mcfg, run.tcfg)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.t_log, self.tokens_since_log, self.tok_per_s = time.perf_counter(), 0, 0.0

    def eval_row(self, it: int, losses: dict[str, float], lr: float) -> None:
        self.metrics.write(kind="eval", iter=it, train_loss=losses["train"],
                           val_loss=losses["val"], lr=lr, tokens_per_s=self.tok_per_s,
                           wall_time=time.perf_counter() - self.t_start)
        if self.is_main:
            self.bar.write(f"iter {it}: train loss {losses['train']:.4f}, "
                           f"val loss {losses['val']:.4f}")
        if self.scalars is not None:
            self.scalars.eval_row(it, losses["train"], losses["val"])

    def stepped(self, it: int, loss: torch.Tensor) -> None:
        self.pending.append((it, loss))
        self.tokens_since_log += self.tokens_per_iter
        self.bar.update(1)

    def train_row(self, it: int, loss: float, lr: float,
                  grad_norm: Optional[torch.Tensor] = None) -> None:
        """The row of iteration ``it`` (its loss read from ``pending``, which empties): loss,
        learning rate, tokens/s (global), model TFLOP/s and MFU (per device; fastgpt.flops) and
        the last step's gradient norm before clipping (None when it clips nothing)."""
        now = time.perf_counter()
        self.tok_per_s = self.tokens_since_log / (now - self.t_log)
        self.t_log, self.tokens_since_log = now, 0
        rates = self.rates
        tflops = rates.tflops(self.tok_per_s) if rates and rates.flops_per_token else None
        mfu = rates.mfu(self.tok_per_s) if rates else None
        norm = None if grad_norm is None else grad_norm.item()
        self.metrics.write(kind="train", iter=it, train_loss=loss, val_loss=None, lr=lr,
                           tokens_per_s=self.tok_per_s, tflops=tflops, mfu=mfu, grad_norm=norm,
                           wall_time=now - self.t_start)
        if self.scalars is not None:
            self.scalars.train_row(it, **{"train/loss": loss, "train/lr": lr,
                                          "train/grad_norm": norm,
                                          "perf/tokens_per_s": self.tok_per_s,
                                          "perf/tflops": tflops, "perf/mfu": mfu})
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tok_per_s:,.0f}",
                             **({"TFLOPs": f"{tflops:.3g}",
                                 "MFU": "unknown" if mfu is None else f"{100 * mfu:.1f}%"}
                                if tflops is not None else {}))
        self.pending.clear()

    def close(self) -> None:
        """Close the bar and the TensorBoard files; rank 0 draws loss.png from the rows written
        so far."""
        self.bar.close()
        if self.scalars is not None:
            self.scalars.close()
        metrics = self.out_dir / METRICS_NAME
        if self.is_main and metrics.exists() and metrics.stat().st_size:
            plot_losses(metrics, self.out_dir / PLOT_NAME)


def _diverged_message(it, value, last_ckpt_iter, ckpt_path) -> str:
    kept = (f"the last good checkpoint ({str(ckpt_path)!r}, iteration {last_ckpt_iter}) is kept"
            if last_ckpt_iter is not None else "no checkpoint had been written yet")
    return (f"loss became {value} at iteration {it}; training stopped and {kept}. Try a lower "
            f"--learning-rate, --grad-clip 1.0, or --dtype float32")
