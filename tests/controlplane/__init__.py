"""Tests of nixfleet/controlplane (a package, so module names never shadow tests/)."""
