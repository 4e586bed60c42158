from torbridge.cli import main

raise SystemExit(main())
