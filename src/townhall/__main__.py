from townhall.cli import main

raise SystemExit(main())
