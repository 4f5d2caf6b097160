"""The divert unit tests import their wire-format helpers from nfq_wire.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
