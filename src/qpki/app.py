"""create_app(): wire settings, database, keys, services, blueprints, headers and limits."""

from __future__ import annotations

import logging
from datetime import timedelta

from argon2 import PasswordHasher
from cryptography.fernet import InvalidToken
from flask import Flask, g, redirect, request, url_for
from flask_login import current_user
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from qpki.audit.context import RequestContext, reset_context, set_context
from qpki.audit.setup import open_audit_log
from qpki.auth.auth_manager import AuthManager
from qpki.auth.key_rotation import sample_stored_tokens
from qpki.auth.keys import KeyFileError, KeyRing, load_key_ring
from qpki.auth.mfa import MFAManager
from qpki.auth.passwords import Passwords
from qpki.auth.services import build_services
from qpki.auth.sessions import SessionPolicy, SessionStore
from qpki.auth.webauthn import relying_party
from qpki.clock import Clock, system_clock
from qpki.config import REDIS_TIMEOUT_SECONDS, Settings, secure_data_dir, secure_sqlite_files
from qpki.db.manager import DatabaseManager
from qpki.logging_setup import configure_logging
from qpki.mail.setup import build_mail, install_mail
from qpki.web.converters import install_url_converters
from qpki.web.errors import install_error_handlers
from qpki.web.event_text import describe_event, device_in_words
from qpki.web.health import ENDPOINTS as HEALTH_ENDPOINTS
from qpki.web.limits import limiter, storage_uri
from qpki.web.security import install_security_headers
from qpki.web.services import register_services
from qpki.web.session_auth import install_login_manager

log = logging.getLogger(__name__)

# Endpoints a user who must change a temporary password may still reach.
_PASSWORD_CHANGE_ALLOWED = {"auth.change_password", "auth.logout", "static", *HEALTH_ENDPOINTS}


def _sample_tokens(db: DatabaseManager, clock: Clock) -> list[str]:
    """The newest stored tokens: TOTP secrets, backup-code sets and unexpired pending setups."""
    return sample_stored_tokens(db, clock())


def _make_files_private(settings: Settings) -> None:
    """Data directory 0700, every file in it (and the SQLite files) 0600 (§12.11), said once."""
    fixed = secure_sqlite_files(settings.database_url) + secure_data_dir(settings.data_dir)
    if fixed:
        log.warning(
            "Made readable by the owner only (they were open to others): %s",
            ", ".join(str(p) for p in dict.fromkeys(fixed)),
        )


def _check_key_matches_data(ring: KeyRing, tokens: list[str], source: str) -> None:
    """Stop start-up when the key cannot decrypt any stored secret (a wrong key was given).

    One bad row is a corrupted row, refused at its own login; none readable is a wrong key,
    which would otherwise refuse every 2FA sign-in while looking healthy.
    """
    if not tokens:
        return
    for token in tokens:
        try:
            ring.fernet.decrypt(token.encode())
        except InvalidToken:
            continue
        return
    raise KeyFileError(
        f"The MFA key from {source} cannot decrypt the 2FA secrets stored in the database "
        "(TOTP secrets, backup codes or pending setups). "
        "Use the key that encrypted them (restore the key file, or fix QPKI_MFA_KEY); "
        "every instance must use the same key."
    )


def _hasher(profile: str) -> PasswordHasher:
    """argon2id with argon2-cffi's defaults; "fast" exists for the test suite only."""
    if profile == "fast":
        return PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    return PasswordHasher()


def create_app(settings: Settings | None = None, *, clock: Clock = system_clock) -> Flask:
    """Build the qPKI web application. ``settings`` defaults to the ``QPKI_*`` environment;
    ``clock`` is the time every service uses (tests pass a SteppedClock)."""
    settings = settings or Settings.from_env()
    configure_logging(
        settings.log_level, json_lines=settings.log_json, instance=settings.instance_name
    )

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_content_length,
        SESSION_COOKIE_NAME="__Host-qpki_session" if settings.https else "qpki_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.https,
        SESSION_COOKIE_PATH="/",
        PREFERRED_URL_SCHEME="https" if settings.https else "http",
        WTF_CSRF_ENABLED=settings.csrf_enabled,
        WTF_CSRF_TIME_LIMIT=None,  # the token is bound to the session, which expires itself
        # The extension is shared by every app in a process; whether this app's limits apply
        # is decided per request from QPKI_RATE_LIMITS (see qpki.web.limits.per_address).
        RATELIMIT_ENABLED=True,
        QPKI_RATE_LIMITS=settings.rate_limits_enabled,
        RATELIMIT_STORAGE_URI=storage_uri(settings),
        RATELIMIT_STORAGE_OPTIONS=(
            {
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_timeout": REDIS_TIMEOUT_SECONDS,
            }
            if settings.redis_url
            else {}
        ),
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
        RATELIMIT_SWALLOW_ERRORS=True,
        TESTING=settings.testing,
        DEBUG=False,
    )
    app.settings = settings  # type: ignore[attr-defined]
    if settings.secret_key_fallbacks:
        # Rolling rotation of QPKI_SECRET_KEY: Flask checks session cookies against the
        # fallbacks too; Flask-WTF does not, so its CSRF tokens get the same keys as an
        # itsdangerous key list (oldest first; the last, current key signs).
        app.config["SECRET_KEY_FALLBACKS"] = list(settings.secret_key_fallbacks)
        app.config["WTF_CSRF_SECRET_KEY"] = [*settings.secret_key_fallbacks, settings.secret_key]
    if settings.proxy_fix_hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app,
            x_for=settings.proxy_fix_hops,
            x_proto=settings.proxy_fix_hops,
            x_host=settings.proxy_fix_hops,
            x_port=settings.proxy_fix_hops,
        )

    _make_files_private(settings)
    db = DatabaseManager(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    tokens = _sample_tokens(db, clock)
    fernet, _keys, key_source = load_key_ring(
        settings.data_dir,
        settings.mfa_key,
        encrypted_data_exists=bool(tokens),
        decrypt_keys=settings.mfa_decrypt_keys,
        reload_interval=settings.mfa_key_reload_seconds,
        token_sample=lambda: _sample_tokens(db, clock),
    )
    _check_key_matches_data(fernet, tokens, key_source)
    log.info(
        "MFA key ring loaded from %s",
        key_source if key_source == "QPKI_MFA_KEY" else "the key file",
    )
    policy = SessionPolicy(
        idle=timedelta(minutes=settings.session_idle_minutes),
        absolute=timedelta(hours=settings.session_absolute_hours),
        pending=timedelta(seconds=settings.pending_mfa_seconds),
    )
    audit = open_audit_log(settings, db)
    passwords = Passwords(_hasher(settings.argon2_profile))
    mail = build_mail(
        settings, db, clock=clock, audit=audit, passwords=passwords, sessions=SessionStore(policy)
    )
    services = build_services(
        db,
        MFAManager(fernet, issuer=settings.issuer),
        audit,
        mail.notifier,
        clock=clock,
        passwords=passwords,
        session_policy=policy,
        reauth_window=timedelta(minutes=settings.reauth_minutes),
        setup_lifetime=timedelta(minutes=settings.setup_session_minutes),
        webauthn_rp=relying_party(
            settings.webauthn_rp_id, settings.webauthn_origins, name=settings.issuer
        ),
    )
    register_services(app, services)
    install_mail(app, mail)
    # The seed's entry points (the specification's migration command and Python API).
    app.db_manager = db  # type: ignore[attr-defined]
    app.mfa_manager = services.mfa  # type: ignore[attr-defined]
    app.auth_manager = AuthManager(services)  # type: ignore[attr-defined]

    CSRFProtect(app)
    limiter.init_app(app)
    install_login_manager(app)
    install_security_headers(app, https=settings.https)
    install_error_handlers(app)
    install_url_converters(app)  # before the blueprints: their <int:...> ids are bounded

    @app.before_request
    def _request_context() -> None:
        g.audit_token = set_context(
            RequestContext(
                ip=request.remote_addr or "",
                user_agent=(request.user_agent.string or "")[:256],
            )
        )

    @app.before_request
    def _force_password_change() -> Response | None:
        if request.endpoint in _PASSWORD_CHANGE_ALLOWED or request.endpoint is None:
            return None
        if current_user.is_authenticated and current_user.must_change_password:
            return redirect(url_for("auth.change_password"))
        return None

    @app.teardown_request
    def _reset_context(_exc: BaseException | None) -> None:
        token = g.pop("audit_token", None)
        if token is not None:
            reset_context(token)

    from qpki.admin.routes import bp as admin_bp
    from qpki.auth.routes import bp as auth_bp
    from qpki.web.health import bp as health_bp
    from qpki.web.routes import bp as main_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(main_bp)
    app.register_blueprint(auth_bp)
    app.register_blueprint(admin_bp)
    from qpki.api import install_api

    install_api(app)  # /api/v1 (service keys), /metrics, problem-details errors on /api/
    from qpki.web.policy_gate import install_policy_gate

    install_policy_gate(app)  # role policies: past the grace, only enrolment opens (§12.5)

    @app.context_processor
    def _template_globals() -> dict[str, object]:
        return {
            "issuer": settings.issuer,
            "describe_event": describe_event,
            "device_in_words": device_in_words,
        }

    return app
