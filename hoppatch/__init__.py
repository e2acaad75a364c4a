"""hoppatch: repairs two-hop (compositional) reasoning failures of causal LMs with a small attention edit.

The public Python API; each name is imported on first use, so `import hoppatch.spec` stays free of torch:

    from hoppatch import apply_delta, read_delta   # the engine's delta files, on your own copy of a model
    from hoppatch import Client, JobSpec           # the service's API
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "apply_delta": "hoppatch.engine.delta",
    "read_delta": "hoppatch.engine.delta",
    "Client": "hoppatch.client",
    "JobSpec": "hoppatch.spec",
    "TwoHopExample": "hoppatch.spec",
    "Budget": "hoppatch.spec",
}

__all__ = ["Budget", "Client", "JobSpec", "TwoHopExample", "__version__", "apply_delta", "read_delta"]

if TYPE_CHECKING:
    from hoppatch.client import Client
    from hoppatch.engine.delta import apply_delta, read_delta
    from hoppatch.spec import Budget, JobSpec, TwoHopExample


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hoppatch' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
