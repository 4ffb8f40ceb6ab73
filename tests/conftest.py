"""Suite-wide settings.

Ray Data 2.60 starts a daemon thread (`data-usage-metrics-poller`, part of its usage statistics) on
the first dataset execution and never stops it. Once that process has called `ray.shutdown()`, the
thread's next poll touches the dead core worker and Ray ends the whole process with exit code 1 and
no message: here, pytest itself, minutes later inside an unrelated test. Usage statistics off means
the thread is never started (the tests also never report usage from CI).
"""

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
