"""Train and evaluate Adapter+ on VTAB-1k / FGVC (to come: see the issue tracker).

Usage (once implemented):
    python main.py --config configs/vtab.py:dtd --workdir runs/dtd
"""

import sys

if __name__ == "__main__":
    print(__doc__)
    sys.exit("main.py: training is not implemented yet; use port_weights.py to port timm weights.")
