"""The `fastgpt` command: prepare, train, sample, export, bench, check, compile-report, dispatch,
report.

Errors meant for the user (FastGPTError, and the input checks of the C++ extension: see
fastgpt.errors.user_error) print as one line without a traceback and exit 2.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import logging
import os
import sys

import torch

from fastgpt import config as cfgmod
from fastgpt.data import read_text
from fastgpt.errors import user_error
from fastgpt.export import ExportOptions, export
from fastgpt.ops import available_backends
from fastgpt.prepare import PrepareOptions, parse_token_count, prepare
from fastgpt.sample import SampleOptions, sample_from_checkpoint
from fastgpt.tools.bench.command import add_bench_parser
from fastgpt.tools.check import add_check_parser
from fastgpt.tools.compile_report import add_compile_report_parser
from fastgpt.tools.dispatch import add_dispatch_parser
from fastgpt.tools.report import add_report_parser
from fastgpt.train import RunOptions, train

# CLI flag -> GPTConfig field holding the backend preference
BACKEND_FLAGS = {name.replace("_", "-"): name for name in cfgmod.BACKEND_FIELDS}


def _preset_values(field: dataclasses.Field) -> str:
    """What each preset sets ``field`` to, e.g. "baby 4, shakespeare-char 6, gpt2-small 12"."""
    return ", ".join(f"{name} {values.get(field.name, field.default)}"
                     for name, values in cfgmod.PRESETS.items())


def _field_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per preset field (--n-layer, --learning-rate, ...), default None = preset's."""
    group = parser.add_argument_group("preset fields (override the preset; default: the "
                                      "preset's value)")
    for f in dataclasses.fields(cfgmod.GPTConfig) + dataclasses.fields(cfgmod.TrainConfig):
        if f.name in BACKEND_FLAGS.values() or f.name == "vocab_size":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=_preset_values(f))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), type(f.default))
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=_preset_values(f))


class _TrainHelp(argparse.HelpFormatter):
    """`fastgpt train --help` lists, under each backend flag, the backends this machine can run.
    They are looked up only when the help is printed: checking the triton ones imports triton
    and torch._inductor (seconds), which no other command line should pay for."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest not in BACKEND_FLAGS.values():
            return action.help
        # the GPT's ops (its loss is linear_cross_entropy; the bigram's is cross_entropy)
        op = "linear_cross_entropy" if action.dest == "cross_entropy" else action.dest
        # triton without a GPU would be the Triton interpreter: a correctness tool, not a backend
        names = [n for n in available_backends(op) if n != "triton" or torch.cuda.is_available()]
        return (f"{action.help}; on this machine: {', '.join(names) or 'none'} (default: "
                f"chosen per input)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: the baby GPT on tiny Shakespeare)",
                       description="Train a character-level model. With no arguments: the `baby` "
                                   "preset on CPU, `shakespeare-char` on CUDA, on the bundled text.",
                       formatter_class=_TrainHelp)
    p.add_argument("--model", default="gpt", choices=["gpt", "bigram"])
    p.add_argument("--preset", default=None, help=f"one of: {', '.join(cfgmod.PRESETS)}")
    p.add_argument("--data", default=None, help="a UTF-8 text file (characters; default: the "
                   "bundled tiny Shakespeare), or token shards: a folder `fastgpt prepare` wrote, "
                   "or a glob of llm.c .bin shards")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: bfloat16 where the hardware has it natively, else "
                        "float32 on CPU, float16 on CUDA), float32, bfloat16 (refused on a CPU "
                        "without native bf16, where it is emulated: tens of times slower), "
                        "float16 (CUDA only)")
    p.add_argument("--exact", action="store_true",
                   help="train with nanoGPT's fp32 math step for step: float32, the torch "
                        "transformer block, sdpa attention and torch's AdamW (the baby run's "
                        "losses equal nanoGPT's to the 4 decimals both print)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the "
                        "processes (FSDP2; each block and the root), checkpoints as a sharded "
                        "directory ckpt.dcp")
    p.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction,
                   default=True, help="free each block's gathered weights after its forward "
                                      "and gather them again for the backward (less memory)")
    p.add_argument("--activation-checkpointing", default="none", metavar="MODE",
                   help="recompute activations in the backward: none, block (keep each "
                        "block's input only) or selective (keep the matmul outputs too)")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="start from GPT-2 weights: a Hugging Face GPT-2 folder (config.json + "
                        "model.safetensors or pytorch_model.bin) or gpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl from the Hugging Face cache; the model's shape is "
                        "the source's (--dropout, --block-size and the backend flags override), "
                        "--data must use its tokenizer")
    for flag in BACKEND_FLAGS:
        p.add_argument(f"--{flag}", default=None, metavar="BACKEND", help=f"{flag} backend")
    p.add_argument("--out-dir", default="out", help="the run directory: checkpoint, "
                   "metrics.jsonl, loss.png (default: out)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over even if --out-dir already holds a checkpoint")
    p.add_argument("--seed", type=int, default=1337,
                   help="seed of the initial weights, batches and dropout (default: 1337)")
    p.add_argument("--sample-chars", type=int, default=300,
                   help="characters (tokens, for token shards) to sample at the end (0: none)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    prof = p.add_argument_group("profiling")
    prof.add_argument("--profile", action="store_true",
                      help="profile a few steps with torch.profiler: trace.json, profile.txt "
                           "(time per op and backend) and, on CUDA, memory_snapshot.pickle in "
                           "--out-dir")
    prof.add_argument("--profile-wait", type=int, default=10, metavar="N",
                      help="steps before the profiled ones")
    prof.add_argument("--profile-steps", type=int, default=5, metavar="N", help="steps profiled")
    prof.add_argument("--tensorboard", default=None, metavar="DIR",
                      help="write loss, learning rate, tokens/s, TFLOP/s, MFU and gradient norm "
                           "for TensorBoard to DIR (tensorboard --logdir DIR)")
    _field_flags(p)
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    field_names = cfgmod.MODEL_FIELDS + cfgmod.TRAIN_FIELDS
    overrides = {name: getattr(args, name) for name in field_names
                 if hasattr(args, name) and getattr(args, name) is not None}
    for flag, name in BACKEND_FLAGS.items():
        overrides[name] = getattr(args, name)
    opts = RunOptions(model=args.model, preset=args.preset, data=args.data, device=args.device,
                      init_from=args.init_from, dtype=args.dtype, exact=args.exact,
                      compile=args.compile,
                      fsdp=args.fsdp, fsdp_reshard_after_forward=args.fsdp_reshard_after_forward,
                      activation_checkpointing=args.activation_checkpointing,
                      out_dir=args.out_dir,
                      resume=args.resume, overwrite=args.overwrite, seed=args.seed,
                      sample_chars=args.sample_chars, progress=args.progress,
                      profile=args.profile, profile_wait=args.profile_wait,
                      profile_steps=args.profile_steps, tensorboard=args.tensorboard,
                      overrides=overrides)
    result = train(opts)
    if result.rank != 0:          # under torchrun only rank 0 reports
        return 0
    if result.sample:
        print("\n--- sample ---")
        print(result.sample)
        print("--------------")
    print(f"done: iter {result.iter_num}, train loss {result.train_loss:.4f}, val loss "
          f"{result.val_loss:.4f} (best {result.best_val_loss:.4f}), wall time "
          f"{result.wall_time:.1f} s; checkpoint, metrics.jsonl and loss.png in {result.out_dir}")
    return 0


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained checkpoint")
    p.add_argument("--out-dir", default="out", help="the run directory holding ckpt.pt")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from a UTF-8 file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="sample from GPT-2 weights instead of --out-dir's checkpoint: a Hugging "
                        "Face GPT-2 folder or gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    prompt = read_text(args.prompt_file) if args.prompt_file else (args.prompt or "\n")
    samples = sample_from_checkpoint(SampleOptions(
        out_dir=args.out_dir, prompt=prompt, num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, device=args.device, init_from=args.init_from))
    for i, text in enumerate(samples):
        if i:
            print("---------------")
        print(text)
    return 0


def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into token shards (llm.c's format)",
                       description="Tokenize documents into llm.c-format token shards "
                                   "(<prefix>_val_NNNNNN.bin, <prefix>_train_NNNNNN.bin) and a "
                                   "meta.json naming the tokenizer. The end-of-text token goes "
                                   "before each document (char: \"\\n\\n\" between them); "
                                   "validation is the first --val-fraction of the text.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="a text file (one document), a folder (its *.txt files, recursively) "
                        "or a .jsonl file (one document per line, its \"text\" field)")
    p.add_argument("--tokenizer", required=True, metavar="{char,gpt2,bpe:N}",
                   help="char (one token per character), gpt2 (GPT-2's BPE via tiktoken), or "
                        "bpe:N (a byte-level BPE of N tokens trained on the inputs)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder for the shards")
    p.add_argument("--val-fraction", type=float, default=0.0005,
                   help="the share of the text, from its start, kept for validation (at least "
                        "8192 characters or half the text; default: 0.0005)")
    p.add_argument("--shard-tokens", default="100M",
                   help="tokens per shard, e.g. 100M (default, as llm.c) or 5000")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"tokenizer processes (default: the CPU count, {os.cpu_count() or 1})")
    p.add_argument("--tokenizer-file", default=None, metavar="PATH",
                   help="gpt2 without tiktoken's cached files: a folder holding GPT-2's "
                        "vocab.bpe and encoder.json, or a .tiktoken rank file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards and meta.json already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    try:
        result = prepare(PrepareOptions(
            inputs=args.inputs, tokenizer=args.tokenizer, out_dir=args.out,
            val_fraction=args.val_fraction, shard_tokens=parse_token_count(args.shard_tokens),
            workers=args.workers, tokenizer_file=args.tokenizer_file, overwrite=args.overwrite,
            progress=args.progress))
    except KeyboardInterrupt:
        print(f"fastgpt: interrupted; {args.out} holds no half-written shard (and no meta.json "
              f"until prepare completes): run it again with --overwrite", file=sys.stderr)
        return 130
    tokens = sum(result.tokens.values())
    print(f"{result.documents:,} document(s) -> {result.tokens['train']:,} train + "
          f"{result.tokens['val']:,} val tokens ({result.tokenizer.name}, vocabulary "
          f"{result.tokenizer.vocab_size:,}) in {sum(map(len, result.shards.values()))} shard(s) "
          f"and meta.json in {result.out_dir}; {result.seconds:.1f} s, "
          f"{tokens / max(result.seconds, 1e-9):,.0f} tokens/s")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's GPT as a Hugging Face GPT-2 folder",
                       description="Write the GPT of a run's checkpoint as a Hugging Face GPT-2 "
                                   "folder (config.json, model.safetensors and the tokenizer "
                                   "files) that transformers.GPT2LMHeadModel.from_pretrained "
                                   "and fastgpt's --init-from load.")
    p.add_argument("--out-dir", default="out", help="the run directory holding ckpt.pt")
    p.add_argument("--hf", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--tokenizer-file", default=None, metavar="PATH",
                   help="a run on GPT-2's tokenizer without tiktoken's cached files: a folder "
                        "holding GPT-2's vocab.bpe and encoder.json, or a .tiktoken rank file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model already in --hf")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    result = export(ExportOptions(out_dir=args.out_dir, hf_dir=args.hf,
                                  tokenizer_file=args.tokenizer_file, overwrite=args.overwrite))
    for note in result.notes:
        print(f"fastgpt: {note}", file=sys.stderr)
    print(f"wrote {', '.join(result.files)} (vocabulary {result.vocab_size:,}) to "
          f"{result.hf_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt", description="Train and sample character-level "
                                     "GPTs with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _prepare_parser(sub)
    _export_parser(sub)
    add_bench_parser(sub)
    add_check_parser(sub)
    add_compile_report_parser(sub)
    add_dispatch_parser(sub)
    add_report_parser(sub)
    return parser


def _freeze_objects_at_exit() -> None:
    """At interpreter exit, move every live object out of the garbage collector's reach.

    Finalization runs full collections over everything torch (and torch._dynamo, matplotlib)
    created, ~0.4-0.9 s after the command's work is done; frozen objects are skipped. Nothing is
    lost: those collections only look for cycles, and Python does not promise to finalize
    objects still alive at exit. Registered once however often main() runs (tests call it).

    Only after a command succeeded, and never under torchrun (WORLD_SIZE > 1). There, after a
    NaN every rank stops, but rank 0 first writes loss.png, and torchrun stops the job when the
    first rank exits; exiting ~0.9 s sooner, the other ranks would cut rank 0 off. And a rank
    whose process-group objects were frozen instead of collected once aborted at exit in CI
    ("terminate called without an active exception", tests/test_distributed.py).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
        if code == 0:
            _freeze_objects_at_exit()
        return code
    except (ValueError, IndexError) as e:   # FastGPTError, or a check of the C++ extension
        message = user_error(e)
        if message is None:
            raise
        print(f"fastgpt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastgpt: interrupted; the last checkpoint written is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
