"""``python -m mailstack``: the admin command."""

from mailstack.admin.cli import main

raise SystemExit(main())
