"""`python -m hvq_jax.cli`: the `hvq` command."""
import sys

from hvq_jax.cli import main

sys.exit(main())
