"""`python -m propensity_cli` runs the `propensity` command."""

from propensity_cli.main import main

raise SystemExit(main())
