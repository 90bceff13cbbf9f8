from sodlib.cli import main

raise SystemExit(main())
