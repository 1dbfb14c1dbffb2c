"""`python -m device_agent` is the same as the `device-agent` command."""

import sys

from device_agent.commands import main

sys.exit(main())
