"""Tests of nixfleet/store (a package, so module names never shadow tests/)."""
