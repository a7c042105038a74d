"""Forms of the /admin pages."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, SelectField, StringField, SubmitField
from wtforms.fields.choices import SelectChoice
from wtforms.validators import DataRequired, Length, Optional

ROLE_CHOICES = [
    SelectChoice("viewer", "Viewer"),
    SelectChoice("operator", "Operator"),
    SelectChoice("admin", "Administrator"),
]


class CreateUserForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=64)])
    email = EmailField("Email", validators=[Optional(), Length(max=254)])
    role = SelectField("Role", choices=ROLE_CHOICES, default="viewer")
    password = PasswordField(
        "Initial password (leave empty to generate a temporary one)",
        validators=[Optional(), Length(max=256)],
    )
    submit = SubmitField("Create user")


class RoleForm(FlaskForm):
    role = SelectField("Role", choices=ROLE_CHOICES)
    submit = SubmitField("Save role")


IDENTITY_NOT_CONFIRMED = (
    "Two-factor authentication was not reset: tick the box to confirm that you have verified "
    "this person's identity by other means."
)


class ResetMFAForm(FlaskForm):
    reason = StringField(
        "Reason (required, recorded in the audit log)",
        validators=[DataRequired(message="A reason is required."), Length(max=500)],
    )
    # Required, not decoration: the reset hands the account to whoever is on the other end of
    # the call, so the admin states the check was made (the browser also marks it required).
    confirm = BooleanField(
        "I have verified this person's identity by other means",
        validators=[DataRequired(message=IDENTITY_NOT_CONFIRMED)],
    )
    submit = SubmitField("Disable 2FA")


class ActionForm(FlaskForm):
    """A button that posts with a CSRF token."""

    submit = SubmitField("Submit")
