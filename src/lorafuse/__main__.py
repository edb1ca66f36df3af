import sys

from lorafuse_entry import main  # the console script's own entry: `python -m lorafuse` is `lorafuse`

sys.exit(main())
