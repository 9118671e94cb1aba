"""``python -m kd_bnn.cli COMMAND ...``: the ``kd-bnn`` console script without installing it."""

from kd_bnn.cli import main

raise SystemExit(main())
