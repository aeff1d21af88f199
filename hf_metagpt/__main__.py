"""`python -m hf_metagpt ...` (also what `accelerate launch -m hf_metagpt` runs)."""

from .cli import main

raise SystemExit(main())
