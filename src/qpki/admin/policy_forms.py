"""The form of one role's policy on ``/admin/policy`` (one per role, prefixed by its name)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, SubmitField
from wtforms.validators import InputRequired, NumberRange

from qpki.auth.policy import MAX_GRACE_HOURS, MAX_REMEMBER_DAYS


class PolicyForm(FlaskForm):
    require_2fa = BooleanField("Require two-factor authentication")
    grace_hours = IntegerField(
        "Grace period (hours)",
        validators=[
            InputRequired(message="Enter the grace period in hours (0 for none)."),
            NumberRange(0, MAX_GRACE_HOURS, message=f"Use 0 to {MAX_GRACE_HOURS} hours."),
        ],
    )
    require_phishing_resistant = BooleanField("Require a passkey or security key")
    new_device_2fa = BooleanField("Require 2FA when signing in from a new device")
    remember_days = IntegerField(
        "Remember devices for (days; 0 = never)",
        validators=[
            InputRequired(message="Enter a number of days (0 for never)."),
            NumberRange(0, MAX_REMEMBER_DAYS, message=f"Use 0 to {MAX_REMEMBER_DAYS} days."),
        ],
    )
    submit = SubmitField("Save policy")
