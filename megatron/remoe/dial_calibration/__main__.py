"""`python -m megatron.remoe.dial_calibration` = `remoe dial`."""

import sys

from megatron.remoe.dial_calibration.command import main

if __name__ == "__main__":  # checkpoint loading may spawn processes: keep this guard
    sys.exit(main())
