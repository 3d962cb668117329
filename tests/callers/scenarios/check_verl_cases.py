"""trl_polar's check of what the installed verl will call, for several override lists in one process.

stdin: {"cases": [[override, ...], ...]}; prints {"results": [{"ok", "report"} or {"error"}]}.
"""

import json
import sys

from trl_polar.integrations.verl_check import check_verl

results = []
for overrides in json.load(sys.stdin)["cases"]:
    try:
        check = check_verl(overrides)
        results.append({"ok": check.ok, "report": check.report()})
    except ValueError as err:
        results.append({"error": str(err)})
print(json.dumps({"results": results}))
