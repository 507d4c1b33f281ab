import sys

from jaxbn.cli.main import main

sys.exit(main())
