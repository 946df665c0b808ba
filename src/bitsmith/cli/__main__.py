import sys

from bitsmith.cli import main

sys.exit(main())
