"""`python -m gateway.cli` = `cy`."""

from gateway.cli.app import main

main()
