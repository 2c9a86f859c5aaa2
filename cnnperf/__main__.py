import sys

from cnnperf.cli import main

sys.exit(main())
