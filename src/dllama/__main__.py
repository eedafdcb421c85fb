from dllama.cli.main import main

raise SystemExit(main())
