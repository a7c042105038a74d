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


class ResetMFAForm(FlaskForm):
    reason = StringField(
        "Reason (required, recorded in the audit log)",
        validators=[DataRequired(message="A reason is required."), Length(max=500)],
    )
    confirm = BooleanField("I have verified this person's identity by other means")
    submit = SubmitField("Disable 2FA")


class ActionForm(FlaskForm):
    """A button that posts with a CSRF token."""

    submit = SubmitField("Submit")
