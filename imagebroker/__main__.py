"""`python -m imagebroker`: the command line."""

from .cli import main

main()
