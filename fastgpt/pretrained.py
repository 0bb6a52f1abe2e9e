"""GPT-2 weights from Hugging Face: ``from_pretrained(source)`` gives a fastgpt GPT.

``source`` is a local folder as ``transformers``' ``save_pretrained`` writes it (``config.json``
and ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``),
or one of the names ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, looked up in the
local Hugging Face cache (``huggingface_hub``; downloaded there unless HF_HUB_OFFLINE is set).
``transformers`` itself is never imported: config.json is read as JSON and the weights with
``safetensors`` or ``torch.load(weights_only=True)``, so a pickle cannot run code.

The conversion maps GPT-2's tensors one by one, checking every shape:

- GPT-2's ``Conv1D`` layers (``c_attn``, ``c_proj``, ``c_fc``) store (in, out) weights;
  nn.Linear's are (out, in), so those four per block are transposed. Biases and LayerNorms map
  as they are (GPT-2 has biases everywhere: ``bias=True``; LayerNorm epsilon 1e-5, fastgpt's).
- The head is tied to ``wte`` (a separate ``lm_head.weight`` must equal it); the attention
  mask buffers (``attn.bias``, ``attn.masked_bias``) of old checkpoints are dropped.
- ``n_positions`` becomes ``block_size``; a smaller ``block_size`` crops the position
  embeddings (nanoGPT's ``crop_block_size``). The vocabulary stays GPT-2's 50,257 unless
  ``vocab_size`` asks for more (50,304 runs faster): the extra rows are zeros, so their logits
  are exactly 0. They are never sampled (``generate(..., vocab_size=)``), but the model's
  cross-entropy counts them, which for GPT-2 (whose logits are mostly far below 0) raises the
  loss a lot: finetuning (`fastgpt train --init-from`) keeps the source's vocabulary.
- GELU: GPT-2's ``gelu_new`` is the tanh approximation, so the model gets
  ``gelu_approximate="tanh"`` (the C++ ``ext`` block computes exact GELU only and declines it;
  every other fast backend runs as for any GPT).

Anything the model cannot hold (another architecture, a different MLP width, an epsilon other
than 1e-5, a tensor of the wrong shape, missing or unknown tensors) is refused with a message
naming it. The tokenizer comes with the model as a fastgpt tokenizer spec (``Pretrained.spec``),
read from the folder: ``fastgpt_tokenizer.json`` (what ``fastgpt export`` writes), GPT-2-format
``vocab.json`` + ``merges.txt`` (GPT-2's own vocabulary gives ``{"kind": "gpt2"}``, another is
inlined as ranks), or a Hugging Face ``tokenizer.json`` (a ``bpe`` spec); a folder with none of
them and GPT-2's 50,257 tokens is GPT-2's.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download, try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from fastgpt.config import BACKEND_FIELDS, GPTConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.tokenizers import (GPT2_FILE_SHA256, GPT2_VOCAB_SIZE, ByteBPETokenizer,
                                GPT2Tokenizer, Tokenizer, load_tokenizer)

# the names resolved through the Hugging Face cache -> their repositories (the old ids first
# found in a cache are tried too)
HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SPEC_NAME = "fastgpt_tokenizer.json"   # the run's tokenizer spec, as fastgpt export writes it
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
ENDOFTEXT = "<|endoftext|>"
LAYER_NORM_EPS = 1e-5                  # torch.nn.functional.layer_norm's, which fastgpt uses
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# overrides from_pretrained takes; every other GPTConfig field is the source's
OVERRIDABLE = ("dropout", "block_size", "vocab_size") + BACKEND_FIELDS


@dataclass
class Pretrained:
    """A converted model and what came with it."""
    model: GPT
    folder: Path                        # the local folder the weights were read from
    spec: Optional[dict]                # the tokenizer's fastgpt spec (None: the source has none)
    tokenizer: Optional[Tokenizer]      # built from the folder's own files, where it holds them
    source_vocab_size: int              # config.json's vocab_size (before any padding)


def from_pretrained(source: str, *, cache_dir: Optional[str] = None, **overrides) -> GPT:
    """A fastgpt GPT holding the GPT-2 weights of ``source`` (a Hugging Face folder or a name:
    gpt2, gpt2-medium, gpt2-large, gpt2-xl). ``overrides``: ``dropout`` (default 0.0),
    ``block_size`` (at most n_positions: crops the position embeddings), ``vocab_size`` (more
    than the source's: zero padding rows) and the backend preferences (``attention``, ...)."""
    folder = resolve_source(source, cache_dir)
    return load_model(folder, **overrides)


def load_pretrained(source: str, *, cache_dir: Optional[str] = None,
                    **overrides) -> Pretrained:
    """from_pretrained's model with the tokenizer of the source (see the module docstring)."""
    folder = resolve_source(source, cache_dir)
    model = load_model(folder, **overrides)
    vocab = read_config(folder)["vocab_size"]
    spec, tokenizer = source_tokenizer(folder, vocab)
    if folder != Path(source).expanduser() and vocab == GPT2_VOCAB_SIZE:
        spec = {"kind": "gpt2"}   # a name: OpenAI's GPT-2, whatever its files' formatting
    return Pretrained(model, folder, spec, tokenizer, vocab)


# --- where the files are ----------------------------------------------------------------------

def resolve_source(source: str, cache_dir: Optional[str] = None) -> Path:
    """The local folder of ``source``: the folder itself, or a name's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FastGPTError(f"{source!r} holds no config.json: a Hugging Face GPT-2 folder "
                               f"holds config.json and model.safetensors (or pytorch_model.bin) "
                               f"as save_pretrained writes them")
        return path
    if source not in HUB_NAMES and source not in HUB_NAMES.values():
        raise FastGPTError(f"{source!r} is neither a folder nor a known model name; give a "
                           f"Hugging Face GPT-2 folder or one of: {', '.join(HUB_NAMES)}")
    return _hub_snapshot(HUB_NAMES.get(source, source), source, cache_dir)


def _hub_snapshot(repo: str, name: str, cache_dir: Optional[str]) -> Path:
    """The cached snapshot folder of ``repo`` that holds config.json and weights; downloaded
    (config, safetensors weights, tokenizer files) when absent and the hub is not offline."""
    cache = Path(cache_dir or hub_constants.HF_HUB_CACHE)
    candidates = [repo] + ([repo.split("/", 1)[1]] if "/" in repo else [])
    for repo_id in candidates:
        config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
        if isinstance(config, str) and _weights_file(Path(config).parent) is not None:
            return Path(config).parent
    how = (f"download it where there is network access (`hf download {repo} "
           f"{' '.join(HUB_FILES)}`, then copy the cache or the folder here), set HF_HOME or "
           f"HF_HUB_CACHE to a cache that holds it, or pass a local folder")
    if hub_constants.is_offline_mode():
        raise FastGPTError(f"{name!r} is not in the Hugging Face cache (looked for "
                           f"{' and '.join(candidates)} in {str(cache)!r}) and HF_HUB_OFFLINE "
                           f"forbids downloading it; {how}")
    try:
        folder = Path(snapshot_download(repo, allow_patterns=HUB_FILES, cache_dir=cache))
    except Exception as e:   # no network, no such repository, an unwritable cache ...
        raise FastGPTError(f"{name!r} is not in the Hugging Face cache (looked for "
                           f"{' and '.join(candidates)} in {str(cache)!r}) and could not be "
                           f"downloaded ({type(e).__name__}); {how}") from None
    if _weights_file(folder) is None:
        raise FastGPTError(f"the download of {repo!r} into {str(folder)!r} holds no "
                           f"{' or '.join(WEIGHT_FILES)}")
    return folder


def _weights_file(folder: Path) -> Optional[Path]:
    return next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)


# --- config.json ------------------------------------------------------------------------------

# config.json's names (save_pretrained writes the first) and GPT2Config's aliases
_CONFIG_KEYS = {"n_layer": ("n_layer", "num_hidden_layers"), "n_head": ("n_head",
                "num_attention_heads"), "n_embd": ("n_embd", "hidden_size"),
                "n_positions": ("n_positions", "max_position_embeddings"),
                "vocab_size": ("vocab_size",)}


def read_config(folder: Path) -> dict:
    """The model's shape from ``config.json``; refuses a model fastgpt's GPT cannot hold."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FastGPTError(f"{str(path)!r} is not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise FastGPTError(f"{str(path)!r} holds no JSON object")
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise FastGPTError(f"{str(path)!r}: model_type is {model_type!r}; only GPT-2 models "
                           f"(model_type 'gpt2') convert to fastgpt's GPT")
    out = {}
    for name, keys in _CONFIG_KEYS.items():
        value = next((raw[k] for k in keys if k in raw), None)
        if not isinstance(value, int) or value < 1:
            raise FastGPTError(f"{str(path)!r}: {keys[0]} must be a positive integer; got "
                               f"{value!r}")
        out[name] = value
    out["gelu_approximate"] = _check_architecture(raw, out, path)
    out["tie_word_embeddings"] = raw.get("tie_word_embeddings", True)
    return out


def _check_architecture(raw: dict, shape: dict, path: Path) -> str:
    """The GELU fastgpt must use; raises where the config asks for math fastgpt's block lacks."""
    act = raw.get("activation_function", "gelu_new")
    checks = [
        (act in GELU, f"activation_function {act!r} (fastgpt's block has {', '.join(GELU)})"),
        (raw.get("n_inner") in (None, 4 * shape["n_embd"]),
         f"n_inner {raw.get('n_inner')} (fastgpt's MLP is 4 x n_embd = {4 * shape['n_embd']})"),
        (math.isclose(raw.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS,
                      rel_tol=1e-6), f"layer_norm_epsilon {raw.get('layer_norm_epsilon')} "
                                     f"(fastgpt's LayerNorms use {LAYER_NORM_EPS})"),
        (raw.get("scale_attn_weights", True), "scale_attn_weights false (fastgpt scales "
                                              "attention scores by 1/sqrt(head size))"),
        (not raw.get("scale_attn_by_inverse_layer_idx", False),
         "scale_attn_by_inverse_layer_idx true (fastgpt's attention scale is the same in "
         "every layer)"),
        (not raw.get("add_cross_attention", False), "add_cross_attention true (fastgpt's "
                                                    "GPT is a decoder only)"),
        (shape["n_embd"] % shape["n_head"] == 0,
         f"n_embd {shape['n_embd']} not divisible by n_head {shape['n_head']}"),
    ]
    for ok, what in checks:
        if not ok:
            raise FastGPTError(f"{str(path)!r}: {what}; this model cannot be converted")
    return GELU[act]


def model_config(hf: dict, overrides: dict) -> GPTConfig:
    """The GPTConfig of a converted model: the source's shape, GPT-2's biases and GELU, with
    ``overrides`` (see OVERRIDABLE) applied; other fields must equal the source's."""
    unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise FastGPTError(f"unknown model config fields {unknown}; from_pretrained takes "
                           f"{', '.join(OVERRIDABLE)}")
    base = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                block_size=hf["n_positions"], vocab_size=hf["vocab_size"], dropout=0.0,
                gelu_approximate=hf["gelu_approximate"])
    for name, value in overrides.items():
        if value is None or name in OVERRIDABLE:
            continue
        if value != base.get(name, getattr(GPTConfig, name, None)):
            raise FastGPTError(f"{name}={value!r} conflicts with the pretrained model's "
                               f"{base.get(name)!r}: its shape comes from the source; only "
                               f"{', '.join(OVERRIDABLE)} can be overridden")
    cfg = {**base, **{k: v for k, v in overrides.items() if v is not None and k in OVERRIDABLE}}
    if cfg["block_size"] > hf["n_positions"]:
        raise FastGPTError(f"block_size {cfg['block_size']} exceeds the model's n_positions "
                           f"{hf['n_positions']} (the positions it has embeddings for); "
                           f"choose at most {hf['n_positions']}")
    if cfg["vocab_size"] < hf["vocab_size"]:
        raise FastGPTError(f"vocab_size {cfg['vocab_size']} is smaller than the model's "
                           f"{hf['vocab_size']}; it can only be padded")
    return GPTConfig(**cfg)


# --- weights ----------------------------------------------------------------------------------

def load_model(folder: Path, **overrides) -> GPT:
    """The GPT of a local Hugging Face GPT-2 folder (see from_pretrained)."""
    hf = read_config(folder)
    cfg = model_config(hf, overrides)
    state = convert_state_dict(read_weights(folder), hf, cfg)
    with torch.device("meta"):   # no random initialisation to overwrite (nor RNG drawn for it)
        model = GPT(cfg)
    model.load_state_dict(state, assign=True)
    model.transformer.wte.weight = model.lm_head.weight   # assign replaced both: tie them again
    return model


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights file(s), on the CPU."""
    path = _weights_file(folder)
    if path is None:
        raise FastGPTError(f"{str(folder)!r} holds no weights: expected one of "
                           f"{', '.join(WEIGHT_FILES)}")
    if path.name == "pytorch_model.bin":
        return _load_pickle(path)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise FastGPTError(f"{str(path)!r} is not a safetensors index ({e})") from None
        return {k: v for shard in shards for k, v in _load_safetensors(folder / shard).items()}
    return _load_safetensors(path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (OSError, SafetensorError) as e:
        raise FastGPTError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated file, or a pickle that holds more than tensors
        raise FastGPTError(f"{str(path)!r} cannot be loaded with weights_only=True, which only "
                           f"reads tensors and plain data ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastGPTError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


def hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 model of this shape, as Hugging Face names and stores it
    (Conv1D weights (in, out)), without the ``transformer.`` prefix."""
    C, V, P = hf["n_embd"], hf["vocab_size"], hf["n_positions"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(hf["n_layer"]):
        block = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C),
                 "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C),
                 "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
                 "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
        shapes.update({f"h.{i}.{k}": v for k, v in block.items()})
    return shapes


def _is_mask_buffer(key: str) -> bool:
    """The causal-mask buffers older GPT-2 checkpoints saved with the weights."""
    return key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")


def convert_state_dict(tensors: dict[str, torch.Tensor], hf: dict,
                       cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors -> a fastgpt GPT state dict for ``cfg`` (fp32)."""
    found = {k.removeprefix("transformer."): v for k, v in tensors.items()
             if not _is_mask_buffer(k)}
    head = found.pop("lm_head.weight", None)
    shapes = hf_shapes(hf)
    missing = [k for k in shapes if k not in found]
    unknown = [k for k in found if k not in shapes]
    if missing or unknown:
        raise FastGPTError("the weights do not match config.json's GPT-2 of "
                           f"{hf['n_layer']} layers: " + "; ".join(
                               f"{what} {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                               for what, keys in (("missing", missing), ("unexpected", unknown))
                               if keys))
    for key, shape in shapes.items():
        if tuple(found[key].shape) != shape:
            raise FastGPTError(f"tensor {key!r} has shape {tuple(found[key].shape)}; config.json's "
                               f"model needs {shape}" + (" (a Conv1D weight is stored (in, out))"
                                                         if key.endswith(CONV1D) else ""))
    if head is not None and not torch.equal(head, found["wte.weight"]):
        raise FastGPTError("lm_head.weight differs from transformer.wte.weight: fastgpt's GPT ties "
                           "the output head to the token embedding, as GPT-2 does")
    if head is None and not hf["tie_word_embeddings"]:
        raise FastGPTError("config.json unties the output head (tie_word_embeddings false) but "
                           "the weights hold no lm_head.weight")
    state = {}
    for key, t in found.items():
        t = t.float()
        if key.endswith(CONV1D):
            t = t.t()                                     # (in, out) -> nn.Linear's (out, in)
        state[f"transformer.{key}"] = t.contiguous()
    wte = state["transformer.wte.weight"]
    if cfg.vocab_size > wte.shape[0]:                     # zero padding rows: logits exactly 0
        wte = torch.cat([wte, wte.new_zeros(cfg.vocab_size - wte.shape[0], wte.shape[1])])
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:cfg.block_size].clone()
    return state


# --- the tokenizer ----------------------------------------------------------------------------

def source_tokenizer(folder: Path, vocab_size: int) -> tuple[Optional[dict], Optional[Tokenizer]]:
    """The tokenizer spec of a source folder, and the tokenizer where its own files build one
    (else None: ``load_tokenizer(spec)`` builds it, e.g. GPT-2's through tiktoken)."""
    local = gpt2_from_hf_files(folder) if (folder / "vocab.json").is_file() \
        and (folder / "merges.txt").is_file() else None
    if (folder / SPEC_NAME).is_file():
        spec = _read_spec(folder / SPEC_NAME)
        # written with the vocab files by fastgpt export: for GPT-2's own, they are its ranks
        tokenizer = (local if local is not None and (specs_match(local.spec, spec)
                                                     or _is_gpt2_own(spec)) else None)
    elif local is not None:
        spec, tokenizer = local.spec, local
    elif (folder / "tokenizer.json").is_file():
        try:
            tokenizer = ByteBPETokenizer(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        except Exception as e:   # tokenizers raises its own Exception subclass
            raise FastGPTError(f"{str(folder / 'tokenizer.json')!r} is not a tokenizers JSON "
                               f"({e})") from None
        spec = tokenizer.spec
    elif vocab_size == GPT2_VOCAB_SIZE:
        spec, tokenizer = {"kind": "gpt2"}, None
    else:
        return None, None
    if tokenizer is None and not _is_gpt2_own(spec):   # inline: builds offline
        tokenizer = load_tokenizer(spec)
    size = tokenizer.vocab_size if tokenizer is not None else GPT2_VOCAB_SIZE
    if size > vocab_size:
        raise FastGPTError(f"the tokenizer in {str(folder)!r} has {size} tokens, more than the "
                           f"model's vocabulary of {vocab_size}")
    return spec, tokenizer


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FastGPTError(f"{str(path)!r} is not a JSON tokenizer spec ({e})") from None
    if not isinstance(spec, dict) or spec.get("kind") not in ("char", "gpt2", "bpe"):
        raise FastGPTError(f"{str(path)!r} is not a fastgpt tokenizer spec: its 'kind' must be "
                           f"char, gpt2 or bpe")
    return spec


def _is_gpt2_own(spec: dict) -> bool:
    """A spec of GPT-2's own vocabulary (tiktoken's, or a recorded copy of its files)."""
    return spec.get("kind") == "gpt2" and "ranks" not in spec


def gpt2_from_hf_files(folder: Path) -> GPT2Tokenizer:
    """The GPT-2-format BPE of Hugging Face's ``vocab.json`` + ``merges.txt`` (the formats of
    OpenAI's encoder.json + vocab.bpe). GPT-2's own vocabulary gets the spec {"kind": "gpt2"}."""
    files = {"encoder.json": folder / "vocab.json", "vocab.bpe": folder / "merges.txt"}
    raw = {name: p.read_bytes() for name, p in files.items()}
    try:
        vocab = json.loads(raw["encoder.json"].decode("utf-8"))
        lines = raw["vocab.bpe"].decode("utf-8").splitlines()
    except (UnicodeDecodeError, ValueError) as e:
        raise FastGPTError(f"{str(folder)!r}: vocab.json and merges.txt are not GPT-2 BPE "
                           f"files ({e})") from None
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    ranks = _ranks_from_hf(vocab, merges, str(folder))
    tokenizer = GPT2Tokenizer.from_ranks(ranks)
    standard = (all(_sha256(raw[n]) == GPT2_FILE_SHA256[n] for n in files)
                or _sha256(tokenizer.spec["ranks"].encode()) == GPT2_FILE_SHA256[".tiktoken"])
    if standard:
        tokenizer.spec = {"kind": "gpt2"}
        tokenizer.name = "gpt2"
    return tokenizer


def _ranks_from_hf(vocab: dict, merges: list[tuple], where: str) -> dict[bytes, int]:
    """tiktoken's {token bytes: rank} from vocab.json's {GPT-2 alphabet string: id} and the
    merges, checked to give the same tokens as Hugging Face's BPE: the 256 bytes, merged tokens
    whose ids rise with the merges' order, ``<|endoftext|>`` the id after the last."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    eot = vocab.pop(ENDOFTEXT, None)
    try:
        ranks = {bytes(byte_of[c] for c in token): int(i) for token, i in vocab.items()}
        merged = [bytes(byte_of[c] for c in a + b) for a, b in merges]
    except (KeyError, ValueError, TypeError) as e:
        raise FastGPTError(f"{where}: vocab.json or merges.txt holds an entry outside GPT-2's "
                           f"byte alphabet ({type(e).__name__}: {e})") from None
    ids = [ranks.get(t, -1) for t in merged]
    problems = [
        (sorted(ranks.values()) == list(range(len(ranks))), "ids 0..n-1, one per token"),
        (all(bytes([b]) in ranks for b in range(256)), "every one of the 256 bytes"),
        (eot == len(ranks), f"{ENDOFTEXT} as id {len(ranks)}, after the last BPE token"),
        (min(ids, default=0) >= 0 and ids == sorted(ids), "merges whose tokens are in "
                                                          "vocab.json with ids in merge order"),
        (len(merged) == sum(len(t) > 1 for t in ranks), "one merge per token of several bytes"),
    ]
    for ok, what in problems:
        if not ok:
            raise FastGPTError(f"{where}: vocab.json and merges.txt are not a GPT-2-format BPE "
                               f"fastgpt can use: it needs {what}")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes (encoder.json's and vocab.json's alphabet):
    printable bytes stand for themselves, the others for chr(256 + n)."""
    kept = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def specs_match(model_spec: dict, data_spec: dict) -> bool:
    """Whether two tokenizer specs give the same token ids: equal, or both GPT-2's own
    vocabulary (one may name the local file it was read from)."""
    return model_spec == data_spec or (_is_gpt2_own(model_spec) and _is_gpt2_own(data_spec))
