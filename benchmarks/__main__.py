"""`python -m benchmarks`: run the benchmark suite (see benchmarks/run.py for the options).

Exits 0 when every benchmark ran (missed goals included), 1 when one crashed.
"""

import sys

from benchmarks.run import main

sys.exit(main())
