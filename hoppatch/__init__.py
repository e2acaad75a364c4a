"""hoppatch: repairs two-hop (compositional) reasoning failures of causal LMs with a small attention edit."""

__version__ = "0.1.0"
