"""nixfleet: declarative fleet manager for NixOS."""

__version__ = "0.1.0"
