import sys

from kvtierd.cli import main

sys.exit(main())
