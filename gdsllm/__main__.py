import sys

from gdsllm.cli import main

sys.exit(main())
