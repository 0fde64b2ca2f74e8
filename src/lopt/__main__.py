import sys

from lopt.cli.main import main

sys.exit(main())
