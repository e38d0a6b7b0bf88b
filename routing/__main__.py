"""``python -m routing eval|fit|explain ...`` until ``mesh route`` is wired in."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
