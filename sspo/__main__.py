"""`python -m sspo`: the `sspo` command."""

from sspo.cli import run

run()
