"""The `nixfleet` command line: thin Click commands over the client and library."""
