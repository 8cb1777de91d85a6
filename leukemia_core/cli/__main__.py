import sys

from leukemia_core.cli import main

sys.exit(main())
