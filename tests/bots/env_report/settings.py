"""A sibling module that reads the environment when it is imported (as config modules do)."""

import os

VALUE_AT_IMPORT = os.environ.get("MY_SECRET", "(not set at import)")
