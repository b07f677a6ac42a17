"""``python -m hf_moeprune.commands``: the ``hf-moeprune`` console script."""

import sys

from hf_moeprune.commands import main

sys.exit(main())
