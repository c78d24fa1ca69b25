"""`python -m sleb ...` and `torchrun ... -m sleb ...`: the same command line as `sleb`."""

from .cli import main

main(prog_name="sleb")
