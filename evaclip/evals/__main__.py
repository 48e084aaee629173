"""``python -m evaclip.evals`` (and ``torchrun -m evaclip.evals``): same as ``evaclip eval``."""
import sys

from evaclip.evals import main

sys.exit(main())
