"""`python -m nixfleet.cli`: the same as the `nixfleet` console script."""

from nixfleet.cli.main import main

main()
