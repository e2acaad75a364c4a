"""The job specification: the one schema shared by the CLI, the service and the workers.

It imports only msgspec and the standard library, so the service validates jobs without torch and the
worker decodes them without Litestar. The example format is versioned by `EXAMPLES_SCHEMA`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

EXAMPLES_SCHEMA = "hoppatch.examples/v1"
"""Version tag of the example format; a file may carry it as `{"schema": ..., "examples": [...]}`."""

MAX_EXAMPLES = 1000
"""Most examples one job may carry (the API sets a lower limit of its own, `HOPPATCH_MAX_EXAMPLES`)."""

MAX_PROMPT_CHARS = 1000
"""Longest prompt or answer, in characters."""

MAX_QUERIES = 32
"""Most paraphrases, generalization or specificity queries per example."""

Text = Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S")]
"""Some text besides white space: a blank answer has no tokens to score."""
ExampleId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class Hop(Struct, frozen=True, forbid_unknown_fields=True):
    """One single-hop cloze and its answer."""

    prompt: Text
    answer: Text


class LabeledQuery(Struct, frozen=True, forbid_unknown_fields=True):
    """A query with the answer it should get (generalization) or keep (specificity)."""

    prompt: Text
    answer: Text


class TwoHopExample(Struct, frozen=True, forbid_unknown_fields=True):
    """A composed two-hop cloze, its two single hops, and the queries that judge a patch.

    `hop1.answer` is the bridge entity; `hop2` is the guide: the second hop with the bridge written out.
    """

    id: ExampleId
    query: Text
    answer: Text
    hop1: Hop
    hop2: Hop
    aliases: Annotated[list[Text], Meta(max_length=MAX_QUERIES)] = []
    paraphrases: Annotated[list[Text], Meta(max_length=MAX_QUERIES)] = []
    generalization: Annotated[list[LabeledQuery], Meta(max_length=MAX_QUERIES)] = []
    specificity: Annotated[list[LabeledQuery], Meta(max_length=MAX_QUERIES)] = []


class Budget(Struct, frozen=True, forbid_unknown_fields=True):
    """What one edit may spend and change."""

    max_layers: Annotated[int, Meta(ge=1, le=16)] = 4
    """Most decoder layers whose attention output projection is edited."""
    max_rank: Annotated[int, Meta(ge=1, le=256)] = 64
    """Highest rank of the update of one layer (one direction per patched example, at most)."""
    max_relative_norm: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    """Largest ‖ΔW‖/‖W‖ (Frobenius) per layer; a larger update is scaled down to it (a job of 20 examples on the
    built-in model needs about 0.3–0.5 before calibration shrinks each example's share)."""
    max_seconds: Annotated[float, Meta(gt=0.0, le=7200.0)] = 1800.0
    """Wall-clock limit of the whole job, model load excluded."""


ModelRef = Annotated[str, Meta(min_length=1, max_length=512, pattern="^[^\\x00-\\x1f\\x7f]+$")]
"""No control characters: a NUL cannot name a file."""
JobId = Annotated[str, Meta(pattern="^job_[0-9a-f]{24}$")]
MAX_BASE_PATCHES = 32


Examples = Annotated[list[TwoHopExample], Meta(min_length=1, max_length=MAX_EXAMPLES)]


class ExamplesDocument(Struct, frozen=True, forbid_unknown_fields=True):
    """The examples as a versioned document, the form an examples file may take."""

    schema: Literal["hoppatch.examples/v1"]
    examples: Examples


class JobSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """An edit job: which model, which examples, what budget."""

    model: ModelRef
    """`builtin:gemma-3-270m`, a local model directory, or a hub id already in the local Hugging Face cache."""
    examples: Examples | ExamplesDocument
    """A list of examples, or an examples document (`{"schema": "hoppatch.examples/v1", "examples": [...]}`):
    every form an examples file takes. The decoded spec always holds the list."""
    budget: Budget = Budget()
    layers: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=16)] | None = None
    """Explicit layers to edit; when absent they are located per job by causal patching."""
    preamble: Annotated[str, Meta(max_length=4 * MAX_PROMPT_CHARS)] = ""
    """A few-shot prefix put before every prompt; base models answer clozes much better with one."""
    metadata: Annotated[dict[str, Annotated[str, Meta(max_length=512)]], Meta(max_length=16)] = {}
    base_patches: Annotated[list[JobId], Meta(max_length=MAX_BASE_PATCHES)] = []
    """Earlier succeeded jobs of the same tenant and model, oldest first: their deltas are applied in order,
    the new patch is solved on top of them, and their probes are re-run as a regression suite."""

    def __post_init__(self) -> None:
        if isinstance(self.examples, ExamplesDocument):
            msgspec.structs.force_setattr(self, "examples", self.examples.examples)
        check_unique_ids(self.examples)
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(REPEATED_LAYERS)
        if len(set(self.base_patches)) != len(self.base_patches):
            raise ValueError(REPEATED_BASE_PATCHES)


DUPLICATE_IDS = "example ids must be unique"
REPEATED_LAYERS = "layers must not repeat"
REPEATED_BASE_PATCHES = "base_patches must not repeat"
CROSS_FIELD_RULES = {DUPLICATE_IDS: "/examples", REPEATED_LAYERS: "/layers", REPEATED_BASE_PATCHES: "/base_patches"}
"""The rules a JSON Schema cannot state field by field, each with the JSON pointer of what breaks it."""


def check_unique_ids(examples: list[TwoHopExample]) -> None:
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(DUPLICATE_IDS)


class ExamplesError(ValueError):
    """An example file cannot be read as hoppatch examples."""


def decode_examples(raw: bytes, source: str = "examples") -> list[TwoHopExample]:
    """Decode a JSON list, a `{"schema", "examples"}` document, or JSON Lines into examples."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        doc = None  # not one document: try JSON Lines
    try:
        if doc is None:
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(doc, dict) and "examples" in doc:
            if doc.get("schema", EXAMPLES_SCHEMA) != EXAMPLES_SCHEMA:
                raise ExamplesError(f"{source}: unknown schema {doc['schema']!r}, expected {EXAMPLES_SCHEMA!r}")
            doc = doc["examples"]
        examples = msgspec.convert(doc if isinstance(doc, list) else [doc], list[TwoHopExample])
    except json.JSONDecodeError as exc:
        raise ExamplesError(f"{source}: neither JSON nor JSON Lines ({exc.msg} at line {exc.lineno})") from None
    except msgspec.ValidationError as exc:
        raise ExamplesError(f"{source}: {exc}") from None
    if not examples:
        raise ExamplesError(f"{source}: no examples")
    try:
        check_unique_ids(examples)
    except ValueError as exc:
        raise ExamplesError(f"{source}: {exc}") from None
    return examples


def read_examples(path: str | Path) -> list[TwoHopExample]:
    """Read an example file (see `decode_examples`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExamplesError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_examples(raw, str(path))


def read_preamble(path: str | Path) -> str:
    """Read a preamble file; its lines are joined as they are, ending with one newline."""
    text = Path(path).read_text(encoding="utf-8").strip("\n")
    return text + "\n" if text else ""


BUILTIN_MODELS = ("builtin:gemma-3-270m", "builtin:smollm2-135m")
"""Models the workers ship with."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class ModelRefError(ValueError):
    """A model reference that no worker could load, whatever it has on disk."""


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ".." in ref.split("/")


def names_directory(ref: str) -> bool:
    """Whether a model reference means a local directory: a path by its form, or an existing directory."""
    if is_local_path(ref):
        return True
    try:
        return local_path(ref).is_dir()
    except (OSError, ModelRefError):  # a name too long for the file system, say: not a directory then
        return False


def local_path(ref: str) -> Path:
    """A directory reference as an absolute path (`~` and `~user` expanded)."""
    try:
        return Path(ref).expanduser().resolve()
    except RuntimeError:  # `~user` of a user this machine does not have
        raise ModelRefError(f"model directory {ref!r}: no such home directory") from None


@lru_cache(maxsize=64)
def _resolved(root: Path) -> Path:
    """A model root's real path: roots are configuration, resolved once per process, not per request."""
    return root.resolve()


def check_model_ref(ref: str, model_roots: Sequence[Path] | None) -> None:
    """The rule for model references: a known built-in, a directory under one of `model_roots` (None: any
    directory), or a hub id (ORG/NAME). Where the model is, and whether it loads, the engine finds out."""
    if ref.startswith("builtin:"):
        if ref not in BUILTIN_MODELS:
            raise ModelRefError(f"unknown built-in model {ref!r}; known: {', '.join(BUILTIN_MODELS)}")
        return
    if names_directory(ref):
        resolved = local_path(ref)
        if model_roots is not None and not any(resolved.is_relative_to(_resolved(root)) for root in model_roots):
            raise ModelRefError(f"model directory {ref!r} is outside the configured model roots")
        return
    if not _HUB_ID.match(ref):
        raise ModelRefError(f"{ref!r} is not a model reference (builtin:NAME, a directory under a model root, or ORG/NAME)")
