"""`python -m turbojax.bench`: the performance harness, the same as `turbojax bench` (harness.py)."""

from turbojax.bench.harness import main

raise SystemExit(main())
