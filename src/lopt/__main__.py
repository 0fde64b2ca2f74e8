import sys

from lopt.cli.main import main

if __name__ == "__main__":  # not when a --jobs worker process (spawn) imports the parent's main module
    sys.exit(main())
