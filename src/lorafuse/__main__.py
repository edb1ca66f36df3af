import sys

from lorafuse_entry import run  # the console script's own entry: `python -m lorafuse` is `lorafuse`

sys.exit(run())
