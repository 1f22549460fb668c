import sys

from lmcor.cli import main

sys.exit(main())
