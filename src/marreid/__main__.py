import sys

from marreid.cli import main

sys.exit(main())
