import sys

from vafunc.cli.app import main

sys.exit(main())
