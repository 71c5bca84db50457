from twinlm.cli import main

raise SystemExit(main())
