"""ms-swift plugin file (``--external_plugins``): registers POLAR as the ORM ``polar`` (``--reward_funcs polar``).

See `trl_polar.integrations.ms_swift`. ms-swift imports this file by its name with its folder on ``sys.path``, so
it imports only absolute ``trl_polar`` names.
"""

import warnings

from trl_polar.integrations.ms_swift import register

try:
    register()
except ImportError as err:  # imported outside an ms-swift process (a documentation or test collector)
    warnings.warn(f"ms-swift is not installed ({err}); the POLAR reward plugin was not registered.", stacklevel=1)
