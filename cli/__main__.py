"""`python -m cli ...` is `charforge ...`."""

from cli.main import main

main()
