from mesh_cli.main import main

raise SystemExit(main())
