"""Tests of nixfleet/api (a package, so module names never shadow tests/)."""
