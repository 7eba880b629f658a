"""The `charforge` command line: the top layer, above the flows."""
