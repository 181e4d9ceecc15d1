import os
import sys

# Tests import helpers as ``tests.<module>`` regardless of where pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
