"""`python -m saltkit.cli ARGS` is `saltkit ARGS` (and `torchrun ... -m saltkit.cli predict ...` runs the
distributed commands)."""

from saltkit.cli import main

raise SystemExit(main())
