import sys

from neuron_assets.cli import main

sys.exit(main())
