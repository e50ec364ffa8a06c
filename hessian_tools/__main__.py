import sys

from hessian_tools.cli import main

sys.exit(main())
