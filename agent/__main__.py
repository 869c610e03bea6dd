import sys

from driftwarden.cli import main

sys.exit(main())
