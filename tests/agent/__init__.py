"""Agent tests (a package, so its conftest and module names never shadow tests/)."""
