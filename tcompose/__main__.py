"""`python -m tcompose` and `accelerate launch -m tcompose <command>`."""

from .cli import main

raise SystemExit(main())
