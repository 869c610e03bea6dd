import sys

from driftwarden.cli.main import main

sys.exit(main())
