import sys

from tideserve.cli import main

sys.exit(main())
