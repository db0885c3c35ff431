"""Access control and request limits for the gateway's API.

Public surface::

    from app.security import install_security
    install_security(app)            # before install_monitoring(app)

See ``app/security/auth.py`` for the rules and ``docs/reliability.md`` for how
they were tested.
"""

from __future__ import annotations

from app.security.auth import SecurityMiddleware, install_security
from app.security.settings import SecuritySettings, TokenSource

__all__ = ["SecurityMiddleware", "SecuritySettings", "TokenSource", "install_security"]
