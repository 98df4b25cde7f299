"""Tests of nixfleet/policy (a package, so module names never shadow tests/)."""
