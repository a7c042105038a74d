"""Forms of the self-service pages reached by mail (field names are part of the contract)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField, StringField, SubmitField
from wtforms.validators import DataRequired, Length


class ForgotPasswordForm(FlaskForm):
    login = StringField(
        "Username or email address",
        validators=[DataRequired(message="Enter your username or email address."), Length(max=254)],
    )
    submit = SubmitField("Send me a link")


class ResetPasswordForm(FlaskForm):
    """The rules themselves (length, common passwords, equality) are checked by the service,
    so the page says exactly what the service decided."""

    new_password = PasswordField(
        "New password",
        validators=[DataRequired(message="Choose a new password."), Length(max=1024)],
    )
    confirm_password = PasswordField(
        "Repeat new password",
        validators=[DataRequired(message="Type the new password again."), Length(max=1024)],
    )
    submit = SubmitField("Set new password")


class ChangeEmailForm(FlaskForm):
    new_email = EmailField(
        "New email address",
        validators=[DataRequired(message="Enter the new email address."), Length(max=254)],
    )
    submit = SubmitField("Send confirmation link")


class ConfirmForm(FlaskForm):
    submit = SubmitField("Confirm")
