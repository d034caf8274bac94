from picogpt.cli import main

raise SystemExit(main())
